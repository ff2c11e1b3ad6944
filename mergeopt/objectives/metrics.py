"""Scores of the merged model that no gradient reaches: exact match, multiple-choice accuracy, user metrics.

The loss is only a proxy for what a mixture is chosen for; these are the scores people report, so
the zero-order strategies can search on them directly. Every function here reads a model that
*already holds* the merged weights: the caller merges into the model's own parameter storage
first, so no second copy of the model exists. Scoring runs batched, under ``torch.no_grad`` and in
eval mode (the model's previous mode is restored), on the device it is given. :class:`Utility`
folds the scores of the recipe's terms into the one number a strategy minimizes.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mergeopt.config import ObjectiveTerm
from mergeopt.errors import UserError
from mergeopt.merging.sharded_merge import is_sharded
from mergeopt.objectives.chat import chat_prompt, is_chat
from mergeopt.objectives.data import collate, tokenize

IGNORE_INDEX = -100
TERMINATORS = ".!?"  # a reference ending in one of these is matched as a prefix (see is_exact_match)

MetricFn = Callable[[torch.nn.Module, Any, list[dict]], float]


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the tokenizer has neither a pad token nor an eos token to pad batches with")
    return pad


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (less padding); callers put results back by index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _require(records: Sequence[dict], kind: str, ok: Callable[[dict], bool], what: str) -> None:
    if not records:
        raise ValueError(f"{kind}: no records to score")
    for i, record in enumerate(records):
        if not ok(record):
            raise UserError(f"{kind} needs {what} records; record {i} has the fields {sorted(record)}")


# ----------------------------------------------------------------------------- exact match


def reference_answer(record: Mapping[str, Any]) -> str:
    """The text exact match compares against: the completion, or the right choice of a choice record."""
    if "completion" in record:
        return record["completion"]
    return record["choices"][record["answer"]]


def is_exact_match(prediction: str, reference: str) -> bool:
    """Whether a greedy continuation (already cut at eos) answers like the reference.

    Both sides are stripped of surrounding whitespace. They match when equal, or when the reference
    ends in a terminator ('.', '!' or '?') and the prediction starts with the whole reference. The
    terminator marks where the answer ends, so what a model generates after it is not part of the
    answer: models fine-tuned without an eos token (the tiny world: "12+8=" -> "20.") never stop on
    their own, and "20.5.." must still be judged on "20.". Without a terminator the model has to
    stop by itself (eos), or "20" would match "200". The price: "20." also matches "20.5", as a
    reader would stop at the first full stop too.
    """
    prediction, reference = prediction.strip(), reference.strip()
    if prediction == reference:
        return True
    return bool(reference) and reference[-1] in TERMINATORS and prediction.startswith(reference)


def greedy_continuations(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
) -> list[str]:
    """Greedy continuation of each prompt, decoded up to the first eos (special tokens dropped).

    Prompts are text, tokenised as :func:`mergeopt.objectives.data.tokenize` tokenises them for the loss
    (with the tokenizer's special tokens, e.g. BOS), or token ids (a rendered conversation), and left-padded, so every row's continuation starts at the
    same column; the attention mask keeps the padding out of the result.
    """
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    synced = is_sharded(model)
    out = [""] * len(prompts)
    with _inference(model):
        for rows in _batches([len(ids) for ids in encoded], batch_size):
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention[r, width - len(encoded[i]) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
                # a sharded stack: every rank runs each forward (its layers gather weights from all)
                synced_gpus=synced,
            )
            for r, i in enumerate(rows):
                tokens = generated[r, width:].tolist()
                if eos is not None and eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (lm-eval-harness's ``until``)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def exact_match(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
    stop: Sequence[str] = (),
) -> float:
    """Fraction of records whose greedy continuation matches the reference (:func:`is_exact_match`).

    Records are prompt/completion or multiple-choice records (the reference is then the right
    choice's text), or conversations: the model answers the conversation before its last message,
    rendered with the chat template's generation prompt, and that message is the reference. Each continuation is cut at eos and at the first of the ``stop`` strings
    (e.g. a newline: a base model answers "41" and goes on with the next question).
    """
    _require(
        records,
        "exact_match",
        lambda r: is_chat(r) or ("prompt" in r and ("completion" in r or "choices" in r)),
        "'prompt'/'completion', multiple-choice or conversation",
    )
    prompts: list[str | list[int]] = []
    references = []
    for i, record in enumerate(records):
        if is_chat(record):
            try:
                prompt, reference = chat_prompt(record, tokenizer)
            except UserError as err:
                raise UserError(f"exact_match: record {i}: {err}") from None
        else:
            prompt, reference = record["prompt"], reference_answer(record)
        prompts.append(prompt)
        references.append(reference)
    predictions = greedy_continuations(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    hits = sum(is_exact_match(cut_at_stop(p, stop), ref) for p, ref in zip(predictions, references))
    return hits / len(records)


# ----------------------------------------------------------------------------- multiple choice


def option_logprobs(
    model: torch.nn.Module, tokenizer, records: Sequence[dict], batch_size: int, device: torch.device | str
) -> list[list[float]]:
    """Σ log p(option tokens | prompt) for every option of every record (lm-eval's loglikelihood).

    Each (record, option) pair is tokenised exactly as the loss tokenises a prompt/completion
    record, and all pairs are batched together, right-padded.
    """
    _require(records, "choice_accuracy", lambda r: "choices" in r, "multiple-choice")
    pairs = [(ri, oi) for ri, r in enumerate(records) for oi in range(len(r["choices"]))]
    examples = []
    for ri, oi in pairs:
        record = records[ri]
        ex = tokenize(
            {"prompt": record["prompt"], "completion": record["choices"][oi]}, tokenizer, sys.maxsize
        )
        if ex is None:
            raise UserError(f"choice_accuracy: option {oi} of record {ri} has no token to score")
        examples.append(ex)
    pad = _pad_id(tokenizer)
    flat = [0.0] * len(pairs)
    with _inference(model):
        for rows in _batches([ex.input_ids.numel() for ex in examples], batch_size):
            batch = collate([(0, examples[i]) for i in rows], pad).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            logits = logits.logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            targets = batch.input_ids[:, 1:].masked_fill(~batch.scored[:, 1:], IGNORE_INDEX)
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).view(targets.shape)
            for r, total in zip(rows, (-nll.sum(dim=1)).tolist()):
                flat[r] = total
    out: list[list[float]] = [[] for _ in records]
    for (ri, _), value in zip(pairs, flat):
        out[ri].append(value)
    return out


def choice_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    length_normalize: bool,
    batch_size: int,
    device: torch.device | str,
) -> float:
    """Fraction of records whose most likely option is the answer (lm-eval's ``acc``).

    With ``length_normalize`` an option's log-likelihood is divided by its length in characters
    (lm-eval's ``acc_norm``), so long options are not penalised for having more tokens. Ties go to
    the earlier option.
    """
    scores = option_logprobs(model, tokenizer, records, batch_size, device)
    hits = 0
    for record, options in zip(records, scores):
        if length_normalize:
            options = [s / len(c) for s, c in zip(options, record["choices"])]
        hits += max(range(len(options)), key=options.__getitem__) == record["answer"]
    return hits / len(records)


# ----------------------------------------------------------------------------- user metrics


def _import_from_cwd() -> None:
    """Put the current directory on ``sys.path`` as ``python -m mergeopt`` does, so ``mergeopt fit``
    (a console script, whose path starts at its own bin directory) finds ``my_metrics.py`` beside
    the recipe the user runs from, as the other spelling of the command does."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)


def load_metric_function(path: str) -> MetricFn:
    """Resolve 'package.module:function' at startup, so a typo fails before any evaluation."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"custom metric {path!r}: expected 'package.module:function'")
    _import_from_cwd()
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a user's module may fail to import in any way
        raise UserError(
            f"custom metric {path!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    if not hasattr(module, attr):
        raise UserError(f"custom metric {path!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(f"custom metric {path!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _single_number(result: Any) -> Any:
    """A one-element tensor or NumPy array as its Python number, anything else as it is.

    Metrics end in either library: ``(preds == refs).float().mean()`` is a 0-d tensor and
    ``np.asarray(hits).mean(keepdims=True)`` or ``tensor.numpy()`` a NumPy array, and both hold
    one number as plainly as a float does.
    """
    if isinstance(result, torch.Tensor) and result.numel() == 1 and not result.is_complex():
        return result.item()
    if isinstance(result, np.ndarray) and result.size == 1 and result.dtype.kind in "biuf":
        return result.item()
    return result


def call_metric(fn: MetricFn, label: str, model: torch.nn.Module, tokenizer, records: list[dict]) -> float:
    """``fn(model, tokenizer, records)`` in eval mode without gradients, as a float.

    A result that is not a real number is the metric author's to fix, so it is a :class:`UserError`
    naming the term; an exception raised inside ``fn`` propagates unchanged (its traceback is what
    the author needs). A NaN or infinite number is returned as it is, as a loss would be: a search
    stops on it and keeps the best finite mixture (``search.non_finite``), and rank, calibrate and
    train refuse it naming the mixture or the run.
    """
    with _inference(model):
        result = _single_number(fn(model, tokenizer, records))
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        raise UserError(f"metric {label!r} returned {type(result).__name__}, not a real number")
    return float(result)


# ----------------------------------------------------------------------------- combining terms


def higher_is_better(term: ObjectiveTerm) -> bool:
    """Losses fall as the model improves, accuracies rise; custom and lm_eval terms say which way."""
    if term.kind in ("custom", "lm_eval"):
        return term.higher_is_better
    return term.kind != "loss"


class Utility:
    """The recipe's term scores folded into one number to *minimize*: minus the weighted macro-average.

    Each term is oriented so that higher is better (a loss enters as -loss). With ``normalize='none'``
    the oriented raw scores are averaged with the terms' weights. With ``normalize='experts'`` each
    term is first min-max normalised over the K single experts' scores, the vertices of the simplex
    (as MergeMix does): 1 = the best expert, 0 = the worst, beyond [0, 1] when a merge beats the
    best or loses to the worst. If all experts tie on a term its spread is taken as 1, so the term
    counts in its own units relative to the experts' common score instead of dividing by zero.
    A utility is built before the vertices are scored and gets their scores via
    :meth:`set_reference`. Scores may be 0-d tensors: the result then keeps their autograd graph.
    """

    def __init__(self, terms: Sequence[ObjectiveTerm], normalize: str = "none") -> None:
        if normalize not in ("none", "experts"):
            raise ValueError(f"normalize must be 'none' or 'experts', not {normalize!r}")
        if not terms:
            raise ValueError("a utility needs at least one term")
        labels = [t.label for t in terms]
        for label in labels:
            if labels.count(label) > 1:
                raise UserError(f"two objective terms are named {label!r}; give one a distinct name")
        self.terms = tuple(terms)
        self.normalize = normalize
        self._sign = {t.label: 1.0 if higher_is_better(t) else -1.0 for t in terms}
        self._weight = {t.label: t.weight for t in terms}
        self._total_weight = sum(self._weight.values())
        self._worst: dict[str, float] | None = None
        self._spread: dict[str, float] | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether the single experts must be scored (and :meth:`set_reference` called) first."""
        return self.normalize == "experts"

    def set_reference(self, vertex_scores: Sequence[Mapping[str, float]]) -> None:
        """The scores of the K single experts (one dict of term scores each), for ``normalize='experts'``."""
        if not vertex_scores:
            raise ValueError("set_reference needs the scores of at least one expert")
        worst, spread = {}, {}
        for label, sign in self._sign.items():
            values = [float(self._score(v, label)) for v in vertex_scores]
            if not all(math.isfinite(x) for x in values):
                raise ValueError(f"term {label!r}: an expert's score is not finite ({values})")
            oriented = [sign * x for x in values]
            worst[label] = min(oriented)
            spread[label] = (max(oriented) - worst[label]) or 1.0
        self._worst, self._spread = worst, spread

    def oriented(self, scores: Mapping[str, Any]) -> dict[str, Any]:
        """Each term's score with higher = better; normalised over the experts in 'experts' mode."""
        if self.needs_reference and self._worst is None:
            raise RuntimeError("normalize='experts' needs the experts' scores: call set_reference first")
        out = {}
        for label, sign in self._sign.items():
            value = sign * self._score(scores, label)
            if self.needs_reference:
                value = (value - self._worst[label]) / self._spread[label]
            out[label] = value
        return out

    def __call__(self, scores: Mapping[str, Any]) -> Any:
        """The value to minimize: -Σ_t weight_t · oriented_t / Σ_t weight_t."""
        oriented = self.oriented(scores)
        return -sum(self._weight[label] * v for label, v in oriented.items()) / self._total_weight

    @staticmethod
    def _score(scores: Mapping[str, Any], label: str) -> Any:
        if label not in scores:
            raise KeyError(f"no score for objective term {label!r} (have {sorted(scores)})")
        return scores[label]
