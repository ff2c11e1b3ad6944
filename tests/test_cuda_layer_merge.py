"""The per-layer merge on a CUDA GPU (skipped without one): the same losses and gradients as on the
CPU in float32, a bfloat16 step close to them, and a measured peak within the plan's estimate."""

from __future__ import annotations

import json

import pytest
import torch

from mergeopt.memory import checkpointing, phases
from mergeopt.memory.sizes import Dims
from mergeopt.merging.stacking import build_stack
from mergeopt.objectives.data import Example, collate
from mergeopt.objectives.loss import dev_loss
from mergeopt.worlds import random_world

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


# a mixture of experts: fused (experts, out, in) weights run by transformers' grouped_mm, whose
# CUDA kernel differs from the CPU's
TINY_MOE = {
    **TINY,
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def _problem(tmp_path, device, dtype, stack_dtype=torch.float32, shapes=TINY):
    (tmp_path / "config.json").write_text(json.dumps(shapes))
    config = random_world.read_config(f"random://{tmp_path}")
    base = random_world.build_base(config, "cpu", torch.float32, 0).to(device=device, dtype=dtype)
    experts = random_world.random_experts(base, config, ["a", "b", "c"], 0, "cpu")
    cpu_experts = {
        n: {k: e[k] for k in e} for n, e in experts.items()
    }  # drawn on the CPU: same on every device
    stack = build_stack(base, cpu_experts, dtype=stack_dtype, progress=False, compute_dtype=dtype)
    return base, stack, config


def _batch(device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (4, 96), generator=gen)
    scored = torch.ones(96, dtype=torch.bool)
    scored[0] = False
    return collate([(0, Example(row, scored.clone())) for row in ids], pad_id=0).to(device)


def _loss_and_grad(model, stack, device):
    z = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64, device=device, requires_grad=True)
    loss = dev_loss(model, stack, z, _batch(device), torch.ones(1), 128)
    loss.backward()
    return float(loss), z.grad.cpu()


def test_float32_step_on_cuda_equals_the_cpu_step(tmp_path):
    cpu = _loss_and_grad(*_problem(tmp_path, "cpu", torch.float32)[:2], "cpu")
    model, stack, _ = _problem(tmp_path, "cuda", torch.float32)
    checkpointing.enable(model)
    gpu = _loss_and_grad(model, stack, "cuda")
    assert abs(gpu[0] - cpu[0]) < 1e-4
    torch.testing.assert_close(gpu[1], cpu[1], atol=1e-5, rtol=1e-3)


def _bfloat16_int8_step(tmp_path, shapes=TINY):
    """A checkpointed bfloat16 step on CUDA with an int8 stack: (loss, ∂L/∂z, the measured peak of
    the step, the plan's training step, the model's dims)."""
    model, stack, config = _problem(tmp_path, "cuda", torch.bfloat16, torch.int8, shapes=shapes)
    checkpointing.enable(model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    loss, grad = _loss_and_grad(model, stack, "cuda")
    peak = torch.cuda.max_memory_allocated() - start
    from tests.test_plan import small_recipe

    r = small_recipe("int8", "bfloat16", 96, activation_checkpointing=True, loss_chunk_tokens=128)
    dims = Dims.from_config(config.to_dict(), "tiny")
    largest = max(t.numel() for t in stack.anchor.values())
    layer = sum(t.numel() for n, t in stack.anchor.items() if ".layers.0." in n)
    return loss, grad, peak, phases.training_bytes(r, dims, 4, largest, 3, 2, layer, True), dims


def test_bfloat16_int8_step_is_close_and_within_the_plan(tmp_path):
    reference = _loss_and_grad(*_problem(tmp_path, "cpu", torch.float32)[:2], "cpu")
    loss, grad, peak, estimate, _ = _bfloat16_int8_step(tmp_path)
    assert abs(loss - reference[0]) < 0.05
    torch.testing.assert_close(grad, reference[1], atol=5e-3, rtol=0.2)
    assert peak <= 1.25 * estimate, (peak, estimate)


def test_mixture_of_experts_steps_on_cuda_as_on_the_cpu_and_within_the_plan(tmp_path):
    """Mixtral's shapes: the float32 step on CUDA equals the CPU's (the routing the same: a token
    near a tie between two experts could route otherwise, hence the looser bounds than Llama's);
    the bfloat16 step with an int8 stack is close, and its measured peak within the plan's
    mixture-of-experts estimate."""
    reference = _loss_and_grad(*_problem(tmp_path, "cpu", torch.float32, shapes=TINY_MOE)[:2], "cpu")
    model, stack, _ = _problem(tmp_path, "cuda", torch.float32, shapes=TINY_MOE)
    assert any(a.dim() == 3 for a in stack.anchor.values())
    checkpointing.enable(model)
    gpu = _loss_and_grad(model, stack, "cuda")
    assert abs(gpu[0] - reference[0]) < 1e-3
    # ∂L/∂z is about 1e-5 here (random:// task vectors are 1e-3 of each weight): relative bounds
    torch.testing.assert_close(gpu[1], reference[1], atol=1e-7, rtol=2e-2)
    loss, grad, peak, estimate, dims = _bfloat16_int8_step(tmp_path, TINY_MOE)
    assert dims.profile.moe
    assert abs(loss - reference[0]) < 0.05
    torch.testing.assert_close(grad, reference[1], atol=3e-6, rtol=0.2)  # CPU: within 0.8e-6
    assert peak <= 1.25 * estimate, (peak, estimate)
