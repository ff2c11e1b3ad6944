"""Metric objectives, checked against reference computations.

Exact match against a step-by-step greedy loop without cache or padding, and against a stub model
whose forced outputs make the answer known; choice accuracy against per-option full forwards and
against a stub with fixed logits; user metrics by import path; the utility by hand.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from mergeopt.config import ObjectiveTerm
from mergeopt.errors import UserError
from mergeopt.objectives.metrics import (
    Utility,
    call_metric,
    choice_accuracy,
    cut_at_stop,
    exact_match,
    greedy_continuations,
    is_exact_match,
    load_metric_function,
    option_logprobs,
)
from mergeopt.worlds import toy
from tests.conftest import recipe_tree, tiny_config

VOCAB = len(toy.SPECIAL) + len(toy.CHARS)


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


@pytest.fixture(scope="module")
def world(tiny_world):
    load = lambda sub: LlamaForCausalLM.from_pretrained(tiny_world / sub).eval()  # noqa: E731
    dev = [json.loads(line) for line in (tiny_world / "dev" / "arith.jsonl").read_text().splitlines()]
    return {
        "tokenizer": AutoTokenizer.from_pretrained(tiny_world / "base"),
        "arith": load("experts/arith"),
        "markov": load("experts/markov"),
        "dev": dev,
    }


def stub_model(logits_of_token: torch.Tensor) -> LlamaForCausalLM:
    """A tiny Llama whose logits at each position are ``logits_of_token[token at that position]``.

    The real forward still runs (cache, masks, generate's bookkeeping); only its logits are replaced,
    so what the model predicts is known exactly and does not depend on padding or context.
    """
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    original = model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        ids = kwargs["input_ids"][:, -out.logits.shape[1] :]
        out.logits = logits_of_token[ids]
        return out

    model.forward = forward
    return model


# ----------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("20.", "20.", True),
        (" 20. ", "20.", True),
        ("20.......", "20.", True),  # the terminator ends the answer
        ("20.xyz", "20.", True),
        ("200.", "20.", False),
        ("2", "20.", False),
        ("20", "20", True),
        ("200", "20", False),  # without a terminator the model must stop by itself
        ("20 apples", "20", False),
        ("", "", True),
        ("x", "", False),
    ],
)
def test_exact_match_rule(prediction, reference, expected):
    assert is_exact_match(prediction, reference) is expected


def forced_successors(tokenizer, successor: dict[str, str]) -> torch.Tensor:
    """Logits that make greedy decoding go token -> successor[token] (others -> 'z')."""
    table = torch.full((VOCAB,), tokenizer.convert_tokens_to_ids("z"))
    for a, b in successor.items():
        table[tokenizer.convert_tokens_to_ids(a)] = tokenizer.convert_tokens_to_ids(b)
    return 30.0 * F.one_hot(table, VOCAB).float()


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_exact_match_on_forced_sequences_gives_the_known_fraction(tokenizer, batch_size):
    # '=' -> "2" then '.' forever (never eos); ':' -> "5" then eos; '(' -> "ab" repeated
    model = stub_model(
        forced_successors(
            tokenizer, {"=": "2", "2": ".", ".": ".", ":": "5", "5": "</s>", "(": "a", "a": "b", "b": "a"}
        )
    )
    records = [
        {"prompt": "1+1=", "completion": "2."},  # "2....." matches: prefix up to the terminator
        {"prompt": "11+1=", "completion": "2"},  # no terminator: "2....." is not "2"
        {"prompt": "q:", "completion": "5"},  # eos right after "5"
        {"prompt": "qqqq:", "completion": "5."},  # "5" lacks the terminator
        {"prompt": "(", "completion": "ababab"},
        {"prompt": "((", "completion": "ab"},
        {"prompt": "2+0=", "choices": ["3", "2."], "answer": 1},  # reference: the right choice
    ]
    predictions = greedy_continuations(model, tokenizer, [r["prompt"] for r in records], 6, batch_size, "cpu")
    assert predictions == ["2.....", "2.....", "5", "5", "ababab", "ababab", "2....."]
    assert exact_match(model, tokenizer, records, 6, batch_size, "cpu") == pytest.approx(4 / 7)
    # cut at ".": "2....." becomes "2", which now matches "2" but no longer "2." (twice); the rest
    # is unchanged: "5" = "5", "ababab" = "ababab"; 3 of 7
    assert exact_match(model, tokenizer, records, 6, batch_size, "cpu", stop=(".",)) == pytest.approx(3 / 7)
    with pytest.raises(UserError, match="exact_match needs .* record 1 has the fields \\['text'\\]"):
        exact_match(model, tokenizer, [records[0], {"text": "abc"}], 6, batch_size, "cpu")


def greedy_reference(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, no cache, no generate(): argmax of a full forward at every step."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_exact_match_equals_the_per_record_loop(world):
    tok, model, records = world["tokenizer"], world["arith"], world["dev"][:40]
    reference = [greedy_reference(model, tok, r["prompt"], 5) for r in records]
    batched = greedy_continuations(model, tok, [r["prompt"] for r in records], 5, 16, "cpu")
    assert batched == reference
    expected = sum(is_exact_match(p, r["completion"]) for p, r in zip(reference, records)) / len(records)
    assert exact_match(model, tok, records, 5, 16, "cpu") == expected


def test_arith_expert_beats_markov_expert_at_arith(world):
    tok, records = world["tokenizer"], world["dev"]
    model = world["arith"].train()  # the metric must switch to eval and back
    arith = exact_match(model, tok, records, 4, 64, "cpu")
    assert model.training
    model.eval()
    markov = exact_match(world["markov"].eval(), tok, records, 4, 64, "cpu")
    # measured: 0.625 vs 0.0625 (128 records, seed 0)
    assert arith >= 0.45 and markov <= 0.2 and arith - markov >= 0.3


# ----------------------------------------------------------------------------- choice accuracy


def option_logprob_reference(model, tokenizer, prompt: str, option: str) -> float:
    """One option alone: full forward, log_softmax, gather the option's tokens, sum."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = torch.arange(len(prompt_ids), ids.shape[1])
    return float(logp[positions - 1, ids[0, positions]].sum())


def test_choice_accuracy_equals_per_option_reference(world):
    tok, model = world["tokenizer"], world["arith"]
    records = []
    for i, r in enumerate(world["dev"][:12]):
        right = r["completion"]
        wrong = [f"{int(right[:-1]) + 1}.", "100.", "7"]  # options of different token lengths
        choices = wrong[: i % 3] + [right] + wrong[i % 3 :]
        records.append({"prompt": r["prompt"], "choices": choices, "answer": i % 3})
    got = option_logprobs(model, tok, records, batch_size=5, device="cpu")
    want = [[option_logprob_reference(model, tok, r["prompt"], c) for c in r["choices"]] for r in records]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    for normalize in (False, True):
        hits = 0
        for r, scores in zip(records, want):
            if normalize:
                scores = [s / len(c) for s, c in zip(scores, r["choices"])]
            hits += scores.index(max(scores)) == r["answer"]
        assert choice_accuracy(model, tok, records, normalize, 5, "cpu") == hits / len(records)


def test_choice_accuracy_with_known_logits(tokenizer):
    # context-free logits: 'a' has logit 5, every other token 0, so log p(a) ≈ -0.28, log p(x) ≈ -5.28
    logits = torch.zeros(VOCAB)
    logits[tokenizer.convert_tokens_to_ids("a")] = 5.0
    model = stub_model(logits.expand(VOCAB, VOCAB))
    log_z = math.log(math.exp(5.0) + VOCAB - 1)
    lp_a, lp_other = 5.0 - log_z, -log_z
    assert option_logprobs(
        model, tokenizer, [{"prompt": "q", "choices": ["ab", "b"], "answer": 0}], 2, "cpu"
    )[0] == pytest.approx([lp_a + lp_other, lp_other], abs=1e-5)
    records = [
        {"prompt": "1", "choices": ["a", "b"], "answer": 0},  # right either way
        {"prompt": "22", "choices": ["a" * 25, "b"], "answer": 0},  # sum -7.1 < -5.3; per char -0.28 > -5.3
        {"prompt": "333", "choices": ["b", "c", "a"], "answer": 2},  # right either way
        {"prompt": "4444", "choices": ["b" * 10, "ab"], "answer": 0},  # wrong either way
    ]
    assert choice_accuracy(model, tokenizer, records, False, 3, "cpu") == 2 / 4
    assert choice_accuracy(model, tokenizer, records, True, 3, "cpu") == 3 / 4
    with pytest.raises(UserError, match="choice_accuracy needs multiple-choice records; record 0"):
        choice_accuracy(model, tokenizer, [{"prompt": "1", "completion": "a"}], False, 3, "cpu")
    # an empty option has no token whose log-probability could be summed: named, not scored 0
    empty = [
        {"prompt": "1", "choices": ["a", "b"], "answer": 0},
        {"prompt": "2", "choices": ["a", ""], "answer": 0},
    ]
    with pytest.raises(UserError, match=r"choice_accuracy: option 1 of record 1 has no token to score$"):
        choice_accuracy(model, tokenizer, empty, False, 3, "cpu")


def test_a_tokenizer_without_pad_or_eos_is_named(tokenizer):
    """Batches are right-padded with the pad token, else eos; a tokenizer with neither cannot pad."""
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.pad_token, bare.eos_token = None, None
    assert bare.pad_token_id is None and bare.eos_token_id is None
    model = stub_model(torch.zeros(VOCAB).expand(VOCAB, VOCAB))
    records = [{"prompt": "1", "choices": ["a", "b"], "answer": 0}]
    with pytest.raises(UserError, match=r"the tokenizer has neither a pad token nor an eos token"):
        choice_accuracy(model, bare, records, False, 3, "cpu")


# ----------------------------------------------------------------------------- user metrics


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    name = "mergeopt_test_user_metric"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "CALLS = []\n"
        "NOT_A_FUNCTION = 3\n"
        "def score(model, tokenizer, records):\n"
        "    CALLS.append((model, tokenizer, records, model.training, torch.is_grad_enabled()))\n"
        "    return torch.tensor(10.0 * len(records))\n"
        "def nan(model, tokenizer, records):\n"
        "    return float('nan')\n"
        "def text(model, tokenizer, records):\n"
        "    return 'high'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_custom_metric_is_called_with_model_tokenizer_records(metric_module):
    fn = load_metric_function(f"{metric_module}:score")
    model, tokenizer, records = torch.nn.Linear(2, 2).train(), object(), [{"text": "a"}, {"text": "b"}]
    assert call_metric(fn, "mine", model, tokenizer, records) == 20.0
    calls = sys.modules[metric_module].CALLS
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1] is tokenizer and calls[0][2] is records
    assert calls[0][3:] == (False, False)  # eval mode, no grad during the call
    assert model.training  # mode restored


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_package_xyz.metrics:score", "cannot import module 'no_such_package_xyz.metrics'"),
        ("{mod}:missing", "module '{mod}' has no attribute 'missing'"),
        ("{mod}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
        ("no_colon", "expected 'package.module:function'"),
    ],
)
def test_bad_metric_paths_name_the_culprit(metric_module, path, message):
    path = path.format(mod=metric_module)
    with pytest.raises(UserError) as err:
        load_metric_function(path)
    assert str(err.value).startswith(f"custom metric {path!r}: ") and message.format(
        mod=metric_module
    ) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_metric_module_beside_the_user_is_found_by_the_console_script(tmp_path, monkeypatch):
    """``mergeopt fit`` (a console script: its sys.path starts at its bin directory, not the current
    directory) imports ``my_metrics.py`` from the directory it runs in, as ``python -m mergeopt`` does."""
    (tmp_path / "cwd_metrics_mergeopt.py").write_text(
        "def score(model, tokenizer, records):\n    return 3.0\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_metrics_mergeopt", raising=False)
    fn = load_metric_function("cwd_metrics_mergeopt:score")
    assert call_metric(fn, "mine", torch.nn.Linear(1, 1), None, []) == 3.0


def test_a_metric_result_that_is_not_a_number_names_the_term(metric_module):
    metric = load_metric_function(f"{metric_module}:text")
    with pytest.raises(UserError, match="metric 'quality:arith' returned str"):
        call_metric(metric, "quality:arith", torch.nn.Linear(1, 1), None, [])


@pytest.mark.parametrize(
    "result, expected",
    [
        (np.array(0.25), 0.25),  # a 0-d array: tensor.numpy(), np.asarray(...).mean()
        (np.array([0.5], dtype=np.float32), 0.5),
        (np.float32(0.75), 0.75),
        (torch.tensor(0.125), 0.125),
    ],
)
def test_a_metric_may_return_one_number_in_a_numpy_array_as_in_a_tensor(result, expected):
    """A one-element NumPy array is a number as plainly as a one-element tensor (both were not: the
    array was refused as 'returned ndarray, not a real number')."""
    value = call_metric(lambda *_: result, "quality:arith", torch.nn.Linear(1, 1), None, [])
    assert value == expected and type(value) is float


@pytest.mark.parametrize("result", [np.array([0.1, 0.2]), np.array("0.5"), np.array(1 + 2j)])
def test_a_numpy_array_that_is_not_one_real_number_is_refused(result):
    with pytest.raises(UserError, match="metric 'quality:arith' returned ndarray, not a real number"):
        call_metric(lambda *_: result, "quality:arith", torch.nn.Linear(1, 1), None, [])


def test_a_nan_metric_result_is_returned_as_a_loss_would_be(metric_module):
    """The caller decides: a search stops on it and keeps its best finite mixture, rank and train refuse it."""
    metric = load_metric_function(f"{metric_module}:nan")
    assert math.isnan(call_metric(metric, "quality:arith", torch.nn.Linear(1, 1), None, []))


# ----------------------------------------------------------------------------- utility


TERMS = (
    ObjectiveTerm(kind="loss"),
    ObjectiveTerm(kind="exact_match", dev="arith", weight=2.0),
    ObjectiveTerm(kind="custom", dev="arith", function="m:f", higher_is_better=False, name="latency"),
)
LABELS = ("loss:all", "exact_match:arith", "latency")


def scores(loss, em, latency):
    return dict(zip(LABELS, (loss, em, latency)))


def test_utility_without_normalization_is_minus_the_oriented_weighted_mean():
    utility = Utility(TERMS, "none")
    assert not utility.needs_reference
    # -(1·(-2.0) + 2·0.5 + 1·(-3.0)) / 4
    assert utility(scores(2.0, 0.5, 3.0)) == pytest.approx(1.0)
    assert utility(scores(1.0, 0.5, 3.0)) < utility(scores(2.0, 0.5, 3.0))  # lower loss is better
    assert utility(scores(2.0, 0.9, 3.0)) < utility(scores(2.0, 0.5, 3.0))  # higher accuracy is better
    assert utility(scores(2.0, 0.5, 1.0)) < utility(scores(2.0, 0.5, 3.0))  # custom: lower is better


def test_utility_normalized_over_the_experts():
    utility = Utility(TERMS, "experts")
    assert utility.needs_reference
    with pytest.raises(RuntimeError, match="set_reference"):
        utility(scores(2.0, 0.5, 1.0))
    utility.set_reference([scores(2.0, 0.2, 1.0), scores(3.0, 0.6, 1.0), scores(2.5, 0.4, 1.0)])
    # loss: best 2.0, worst 3.0 -> 0.75; exact match: (0.5 - 0.2) / 0.4 = 0.75;
    # latency: every expert 1.0, spread taken as 1 -> -(1.5 - 1.0) = -0.5
    assert utility.oriented(scores(2.25, 0.5, 1.5)) == pytest.approx(dict(zip(LABELS, (0.75, 0.75, -0.5))))
    assert utility(scores(2.25, 0.5, 1.5)) == pytest.approx(-(0.75 + 2 * 0.75 - 0.5) / 4)
    assert utility.oriented(scores(2.0, 0.2, 1.0)) == pytest.approx(dict(zip(LABELS, (1.0, 0.0, 0.0))))
    assert utility.oriented(scores(3.0, 0.6, 1.0)) == pytest.approx(dict(zip(LABELS, (0.0, 1.0, 0.0))))


def test_utility_keeps_the_gradient_of_tensor_scores():
    utility = Utility(TERMS, "experts")
    utility.set_reference([scores(2.0, 0.2, 1.0), scores(4.0, 0.6, 2.0)])
    loss = torch.tensor(3.0, requires_grad=True)
    value = utility(scores(loss, 0.4, 1.5))
    value.backward()
    # loss enters as -(-(loss) - (-4.0)) / 2.0 · 1/4, so d/dloss = 1 / (2.0 · 4)
    assert loss.grad.item() == pytest.approx(1 / 8)
    assert value.item() == pytest.approx(-(0.5 + 2 * 0.5 + 0.5) / 4)


def test_utility_rejects_terms_sharing_a_label():
    with pytest.raises(UserError, match="two objective terms are named 'loss:all'"):
        Utility((ObjectiveTerm(kind="loss"), ObjectiveTerm(kind="loss", weight=2.0)))


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("41\nQuestion: next", ("\n",), "41"),
        ("41\nQuestion: next", (), "41\nQuestion: next"),
        ("a;b\nc", ("\n", ";"), "a"),
        ("abc", ("\n",), "abc"),
        ("abc", ("",), "abc"),  # an empty stop string cuts nothing
    ],
)
def test_generations_are_cut_at_the_first_stop_string(text, stop, expected):
    assert cut_at_stop(text, stop) == expected


def test_a_bad_metric_path_is_refused_before_the_experts_are_stacked(random_world, tmp_path, monkeypatch):
    """fit reads the dev sets before it stacks the experts (minutes on a large model): a custom
    term whose function does not import is refused there, not after the stacking."""
    from mergeopt.config import recipe_from_dict
    from mergeopt.fit import fit
    from mergeopt.loading import problem

    def stacked(*args, **kwargs):
        raise AssertionError("the experts were stacked before the metric path was checked")

    monkeypatch.setattr(problem, "_stack_experts", stacked)
    term = {"kind": "custom", "dev": "arith", "function": "no_such_package_xyz.metrics:score"}
    tree = recipe_tree(
        random_world, tmp_path / "run", objective={"terms": [term]}, search={"strategy": "grid"}
    )
    with pytest.raises(UserError, match="cannot import module 'no_such_package_xyz.metrics'"):
        fit(recipe_from_dict(tree), progress=False, log=lambda _m: None)
