"""Loss evaluations in ``model.eval_dtype`` while the model and its steps are in a narrower dtype.

Reference: the same model in float32 throughout. The bfloat16 model is loaded from the same
weights rounded to bfloat16 (so casting them back is exact) and stacks the same float32 experts:
evaluated in float32 it must give the reference's losses to float32 rounding, for a dense stack
across architectures (tied embeddings, Conv1D) with parameters left out of the stack, and for
LoRA experts kept low-rank; evaluated in its own bfloat16 it must not (the context matters). The
model must come out exactly as it went in.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

from mergeopt.merging.eval_dtype import CastTo, evaluating_in
from mergeopt.merging.layer_merge import MergedParameter
from mergeopt.merging.mixed_experts import build_expert_stack
from mergeopt.merging.stacking import build_stack
from mergeopt.objectives.data import DevSet, Example
from mergeopt.objectives.loss import evaluate_sums
from tests.test_layer_merge import VOCAB, perturbed_experts, tiny_model

W = torch.tensor([0.2, 0.45, 0.35], dtype=torch.float64)
EXCLUDE = ("norm", "ln_", "embed", "wte")  # left out of the stack: read through the cast


def dev_sets(vocab: int = VOCAB) -> list[DevSet]:
    gen = torch.Generator().manual_seed(3)
    examples = []
    for length in (12, 9, 11, 7):
        ids = torch.randint(3, vocab, (length,), generator=gen)
        scored = torch.ones(length, dtype=torch.bool)
        scored[:2] = False
        examples.append(Example(input_ids=ids, scored=scored))
    return [DevSet(name="a", weight=1.0, fit=examples[:2], heldout=[]), DevSet("b", 1.0, examples[2:], [])]


def losses(model, stack, chunk: int | None = 5) -> torch.Tensor:
    sums, counts = evaluate_sums(model, stack, W, dev_sets(), "fit", 2, 0, torch.device("cpu"), chunk)
    return sums / counts


def rounded_to_bfloat16(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def snapshot(model: torch.nn.Module) -> list:
    params = [(n, id(p), p.dtype) for n, p in model.named_parameters(remove_duplicate=False)]
    buffers = [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)]
    merges = [(n, m.compute_dtype) for n, m in model.named_modules() if isinstance(m, MergedParameter)]
    classes = [(n, type(m).__name__) for n, m in model.named_modules()]
    return [params, buffers, merges, classes]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_float32_evaluation_of_a_bfloat16_model_equals_the_float32_model(arch):
    base = rounded_to_bfloat16(tiny_model(arch))
    experts = perturbed_experts(base, count=3, scale=0.02)
    reference_model = copy.deepcopy(base)
    reference = build_stack(reference_model, experts, EXCLUDE, progress=False)
    want = losses(reference_model, reference)

    model = copy.deepcopy(base).to(torch.bfloat16)
    stack = build_stack(model, experts, EXCLUDE, torch.float32, progress=False, compute_dtype=torch.bfloat16)
    assert stack.excluded and stack.deltas  # both kinds of parameters are read in the evaluation
    before = snapshot(model)
    narrow = losses(model, stack)  # eval_dtype None: the compute dtype
    stack.eval_dtype = torch.float32
    got = losses(model, stack)

    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (narrow - want).abs().max() > 1e-4  # bfloat16 evaluations do differ
    assert snapshot(model) == before
    if arch in ("gemma2", "gpt2"):  # tied: the output layer still is the embedding
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_whole_logits_evaluation_in_float32():
    """A model the chunked loss cannot reproduce scores its own logits: the same agreement."""
    base = rounded_to_bfloat16(tiny_model("llama"))
    experts = perturbed_experts(base, count=3, scale=0.02)
    reference_model = copy.deepcopy(base)
    want = losses(reference_model, build_stack(reference_model, experts, EXCLUDE, progress=False), None)
    model = copy.deepcopy(base).to(torch.bfloat16)
    stack = build_stack(model, experts, EXCLUDE, torch.float32, progress=False, compute_dtype=torch.bfloat16)
    stack.eval_dtype = torch.float32
    torch.testing.assert_close(losses(model, stack, None), want, rtol=1e-6, atol=0)


def test_lora_experts_evaluate_in_float32(tmp_path):
    """LoRA experts kept low-rank beside a dense one: the low-rank update follows the activations."""
    from tests.test_lowrank import NAMES, make_world

    base, adapters, dense, _ = make_world(tmp_path)
    base = rounded_to_bfloat16(base)
    names = list(NAMES)
    reference_model = copy.deepcopy(base)
    reference = build_expert_stack(
        reference_model, names, {"alpha": dense["alpha"]}, {n: adapters[n] for n in names[1:]}, progress=False
    )
    vocab = base.config.vocab_size

    def lora_losses(model, stack):
        sets = dev_sets(vocab)
        sums, counts = evaluate_sums(model, stack, W, sets, "fit", 2, 0, torch.device("cpu"), 5)
        return sums / counts

    want = lora_losses(reference_model, reference)
    model = copy.deepcopy(base).to(torch.bfloat16)
    stack = build_expert_stack(
        model,
        names,
        {"alpha": dense["alpha"]},
        {n: adapters[n] for n in names[1:]},
        dtype=torch.float32,
        progress=False,
        compute_dtype=torch.bfloat16,
    )
    assert stack.lowrank is not None and stack.deltas
    narrow = lora_losses(model, stack)
    stack.eval_dtype = torch.float32
    got = lora_losses(model, stack)
    # the LoRA factors are stored in float32 here (the stack dtype): exact after the cast
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (narrow - want).abs().max() > 1e-4


def test_nothing_is_cast_when_the_dtypes_agree():
    model = tiny_model("llama")
    stack = build_stack(model, perturbed_experts(model), EXCLUDE, progress=False)
    calls = []
    original = parametrize.register_parametrization
    parametrize.register_parametrization = lambda *a, **k: calls.append(a)
    try:
        with evaluating_in(model, torch.float32):
            pass
        with evaluating_in(model, None):
            pass
    finally:
        parametrize.register_parametrization = original
    assert calls == [] and stack.eval_dtype is None


def test_the_model_is_restored_after_an_error():
    model = tiny_model("gpt2").to(torch.bfloat16)
    experts = perturbed_experts(tiny_model("gpt2"))
    build_stack(model, experts, EXCLUDE, torch.float32, progress=False, compute_dtype=torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating_in(model, torch.float32):
            assert model.transformer.wte.weight.dtype == torch.float32
            assert any(isinstance(m, CastTo) for m in model.modules())
            raise RuntimeError("boom")
    assert snapshot(model) == before
    assert not any(isinstance(m, CastTo) for m in model.modules())
