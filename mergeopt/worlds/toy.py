"""The tiny world: a small but real mixture problem that builds in well under a minute on a CPU.

A random-init tiny Llama is pretrained briefly on a blend of four synthetic domains, then one
expert per domain is fine-tuned from it. The domains pull the weights in different directions
(arithmetic, string reversal, bracket closing, a Markov "language"), so the best merge is neither
one expert nor the uniform average. Everything is written as ordinary Hugging Face checkpoints and
JSONL files, so ``mergeopt.fit`` loads it exactly as it loads real checkpoints. Recipes refer to it
with ``tiny://`` paths (``tiny://base``, ``tiny://experts/arith``, ``tiny://dev/arith.jsonl``,
``tiny://train/arith.jsonl``); :mod:`mergeopt.worlds` builds it on first use and caches it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mergeopt.objectives.data import Example, collate, tokenize
from mergeopt.runtime import faults
from mergeopt.runtime.interrupts import check_interrupt

WORLD_VERSION = 1
DOMAINS = ("arith", "reverse", "brackets", "markov")
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+=-()[]<>:;., "
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
N_TRAIN, N_DEV = 2000, 128

# Model and schedule: sized so the whole build takes ~20 s on 2 cores.
MODEL = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# The same world with a model 8x larger (2x wider, 2x deeper): ``tiny-large://``, for checking that a
# ranking of mixtures at one model size carries to another (`mergeopt transfer`).
LARGE_MODEL = dict(MODEL, hidden_size=128, intermediate_size=320, num_hidden_layers=4)
BASE_STEPS, BASE_LR = 300, 3e-3
EXPERT_STEPS, EXPERT_LR = 150, 2e-3
BATCH = 32


# ----------------------------------------------------------------------------- domains


def _arith(rng: random.Random) -> dict[str, str]:
    a, b = rng.randrange(20), rng.randrange(20)
    return {"prompt": f"{a}+{b}=", "completion": f"{a + b}."}


def _reverse(rng: random.Random) -> dict[str, str]:
    s = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6)))
    return {"prompt": f"rev {s}:", "completion": f"{s[::-1]}."}


_PAIRS = {"(": ")", "[": "]", "<": ">"}


def _brackets(rng: random.Random) -> dict[str, str]:
    stack: list[str] = []
    out = []
    for _ in range(rng.randint(3, 8)):
        if stack and rng.random() < 0.4:
            out.append(_PAIRS[stack.pop()])
        else:
            stack.append(rng.choice("([<"))
            out.append(stack[-1])
    if not stack:
        stack.append("(")
        out.append("(")
    return {"prompt": "".join(out) + ":", "completion": "".join(_PAIRS[c] for c in reversed(stack)) + "."}


def _markov_sampler(seed: int) -> Callable[[random.Random], dict[str, str]]:
    alphabet = "ghijklmnop "
    table_rng = random.Random(seed * 7919 + 17)
    table = {c: table_rng.sample(alphabet, 3) for c in alphabet}  # each letter has 3 successors

    def sample(rng: random.Random) -> dict[str, str]:
        c = rng.choice("ghijklmnop")
        text = [c]
        for _ in range(rng.randint(20, 32)):
            c = rng.choice(table[c])
            text.append(c)
        return {"text": "".join(text).strip() + "."}

    return sample


def domain_samplers(seed: int) -> dict[str, Callable[[random.Random], dict[str, str]]]:
    return {"arith": _arith, "reverse": _reverse, "brackets": _brackets, "markov": _markov_sampler(seed)}


# ----------------------------------------------------------------------------- model and tokenizer


def build_tokenizer():
    """A character-level fast tokenizer (BOS prepended), saved and loaded like any HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(vocab_size: int, seed: int, shape: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = MODEL if shape is None else shape
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    return LlamaForCausalLM(config)


def train_on(
    model: torch.nn.Module, examples: Sequence[Example], steps: int, lr: float, batch_size: int, seed: int
) -> float:
    """Plain AdamW on the scored tokens (completions, or all text); returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        batch = collate([(0, examples[i]) for i in idx], pad_id=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        mask = batch.scored[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[mask], batch.input_ids[:, 1:][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # linear decay: experts stay close to the base
            group["lr"] = lr * (1 - step / steps)
        optimizer.step()
        faults.reached("world", step + 1)  # tests only (MERGEOPT_FAULT=sigint@world:N)
        check_interrupt(f"the world build, step {step + 1}")  # Ctrl-C: the staging is removed
    model.eval()
    return float(loss.detach())


# ----------------------------------------------------------------------------- building


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def build_into(
    root: Path, seed: int = 0, log: Callable[[str], None] = print, shape: dict | None = None
) -> dict:
    """Write the tiny world into the empty directory ``root``; returns its description.

    Callers go through :func:`mergeopt.worlds.ensure`, which builds into a staging directory and
    renames it into the cache, so a half-built world is never visible. ``shape`` is the model's
    size (default :data:`MODEL`); the data depend on the seed only, so worlds of two sizes share them.
    """
    shape = MODEL if shape is None else shape
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    samplers = domain_samplers(seed)
    data: dict[str, dict[str, list[dict]]] = {}
    for i, name in enumerate(DOMAINS):
        rng = random.Random(seed * 1000 + i)
        data[name] = {
            split: [samplers[name](rng) for _ in range(n)]
            for split, n in (("train", N_TRAIN), ("dev", N_DEV))
        }
        for split in ("train", "dev"):
            _write_jsonl(root / split / f"{name}.jsonl", data[name][split])
    train = {name: [tokenize(r, tokenizer, 64) for r in data[name]["train"]] for name in DOMAINS}

    log(
        f"tiny world ({shape['hidden_size']}x{shape['num_hidden_layers']}): pretraining the base on {len(DOMAINS)} domains"
    )
    model = build_model(len(tokenizer), seed, shape)
    blend = [ex for name in DOMAINS for ex in train[name]]
    train_on(model, blend, BASE_STEPS, BASE_LR, BATCH, seed)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    for i, name in enumerate(DOMAINS):
        log(f"tiny world: fine-tuning the {name} expert")
        model.load_state_dict(base_state)
        train_on(model, train[name], EXPERT_STEPS, EXPERT_LR, BATCH, seed + 1 + i)
        model.save_pretrained(root / "experts" / name)
        tokenizer.save_pretrained(root / "experts" / name)
    return {"domains": list(DOMAINS), "model": shape}


class LargeWorld:
    """The registry entry of ``tiny-large://``: the tiny world's data, a model of :data:`LARGE_MODEL`."""

    WORLD_VERSION = WORLD_VERSION

    @staticmethod
    def build_into(root: Path, seed: int = 0, log: Callable[[str], None] = print) -> dict:
        return build_into(root, seed, log, LARGE_MODEL)
