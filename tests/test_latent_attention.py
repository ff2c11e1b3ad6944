"""The plan's multi-head latent attention (mergeopt.memory.latent_attention) against DeepSeek-V3's
layers run by transformers: what one layer saves for the backward, exactly, over the shapes that
change it (a q latent or none, q wider than v, so that the CPU runs SDPA's math kernel, or as wide,
so that it runs its fused kernel, as a GPU does; one sequence or several), with and without weight
gradients; an evaluation batch's working set within 15% either way; and, on a GPU, what the
memory-efficient kernel saves."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from mergeopt.errors import UserError
from mergeopt.memory import activations
from mergeopt.memory.latent_attention import LatentAttention
from mergeopt.memory.sizes import Dims
from tests.test_layer_profiles import saved_bytes
from tests.test_plan import LiveBytes

HIDDEN, VOCAB = 64, 200
# (heads, q latent, kv latent, width without rotary embedding, rotated width, v width, sequences, length)
SHAPES = [
    (4, 16, 16, 8, 16, 8, 3, 40),  # q and k wider than v: the CPU's math kernel
    (2, None, 24, 16, 8, 16, 2, 33),  # no q latent (DeepSeek-V2-Lite's kind)
    (4, 24, 16, 8, 8, 16, 3, 48),  # q, k and v as wide: the CPU's fused kernel, as on a GPU
    (3, None, 8, 12, 4, 16, 2, 29),  # as wide, no q latent
    (8, 32, 32, 16, 8, 8, 1, 64),  # one sequence (no padding)
]


def _config(shape: tuple, layers: int) -> transformers.DeepseekV3Config:
    heads, q_rank, kv_rank, nope, rope, v, *_ = shape
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=q_rank,
        kv_lora_rank=kv_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
        first_k_dense_replace=layers,  # dense MLPs: the attention is what differs
        n_routed_experts=8,
        max_position_embeddings=128,
    )


def _layer_bytes(shape: tuple, dtype: torch.dtype, frozen: bool) -> int:
    """What autograd saves for one layer: a 2-layer model's less a 1-layer model's, weights left out."""
    *_, batch, length = shape
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, length - 5 :] = 0  # right padding, as the dev sets are batched

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = transformers.DeepseekV3ForCausalLM(_config(shape, layers)).to(dtype)
        model.requires_grad_(not frozen)
        embedded = model.get_input_embeddings()(ids).detach().requires_grad_()
        run = lambda: model.model(inputs_embeds=embedded, attention_mask=mask, use_cache=False)  # noqa: E731
        return saved_bytes(run, [*model.parameters(), *model.buffers()])

    return saved(2) - saved(1)


@pytest.mark.parametrize("frozen", [False, True], ids=["merged", "frozen"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_one_layer_saves_what_the_plan_says(shape, compute, frozen):
    """A dense DeepSeek-V3 layer on the CPU: the distinct storages autograd saves equal
    layer_activation_bytes with the latent attention's widths, for the kernel the CPU runs."""
    dtype = getattr(torch, compute)
    dims = Dims.from_config(_config(shape, 2).to_dict(), "base").on_device("cpu")
    *_, batch, length = shape
    heads, _, _, nope, rope, v, *_ = shape
    assert dims.latent_attention.math_kernel == (nope + rope != v)
    dense = dims.layer_kinds()[0][0]  # the dense layers' kind
    planned = activations.layer_activation_bytes(dense, batch, length, dtype.itemsize, frozen)
    assert _layer_bytes(shape, dtype, frozen) == planned


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "-".join(map(str, s)))
def test_evaluation_bytes_bound_the_live_peak(shape, compute):
    """Without autograd (an evaluation batch), a 2-layer model: the plan's layer working set (its
    attention's moment, the largest here) within 15% either way of the peak of live tensor bytes
    beyond the residual stream."""
    dtype = getattr(torch, compute)
    *_, batch, length = shape
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(_config(shape, 2)).to(dtype).eval()
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, length - 5 :] = 0
    embedded = model.get_input_embeddings()(ids)
    with torch.no_grad(), LiveBytes([*model.parameters(), *model.buffers(), embedded]) as live:
        model.model(inputs_embeds=embedded, attention_mask=mask, use_cache=False)
    latent = Dims.from_config(model.config.to_dict(), "base").on_device("cpu").latent_attention
    planned = latent.evaluation_bytes(HIDDEN, shape[0], batch, length, dtype.itemsize)
    planned += dtype.itemsize * batch * length * HIDDEN  # the residual stream
    assert 0.85 * live.peak <= planned <= 1.15 * live.peak, planned / live.peak


def test_a_released_config_plans_latent_attention_and_the_gpu_kernel():
    """DeepSeek-V3's config (transformers' defaults for it): the plan reads its latent widths and
    rotary embedding over the rotated part alone; a GPU runs the fused kernel, a CPU the math
    kernel (q and k 192 wide, v 128)."""
    config = transformers.DeepseekV3Config().to_dict()
    dims = Dims.from_config(config, "base")
    assert dims.latent_attention == LatentAttention(1536, 512, 128, 64, 128)
    assert dims.rotary_width == 64
    assert dims.on_device("cuda:0") == dims and not dims.on_device("cuda").latent_attention.math_kernel
    assert dims.on_device("cpu").latent_attention.math_kernel
    llama = Dims.from_config(transformers.LlamaConfig().to_dict(), "base")
    assert llama.on_device("cpu") is llama and llama.latent_attention is None


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(qk_nope_head_dim=None), " has kv_lora_rank (latent attention) but no integer qk_nope_head_dim"),
        (dict(v_head_dim="128"), " has kv_lora_rank (latent attention) but no integer v_head_dim"),
        (dict(q_lora_rank=1.5), "'s q_lora_rank must be an integer or null, not 1.5"),
    ],
)
def test_latent_attention_without_its_widths_is_named(change, message):
    """A config.json with kv_lora_rank but a width missing or not an integer: one line naming the
    key, not a TypeError."""
    config = {**transformers.DeepseekV3Config().to_dict(), **change}
    with pytest.raises(UserError, match="^" + re.escape(f"base: config.json{message}")):
        Dims.from_config(config, "base")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=lambda s: "-".join(map(str, s)))
def test_on_a_gpu_the_plan_matches_what_a_layer_saves(shape, compute):
    """On a CUDA GPU (the GPU check runs this): a DeepSeek-V3 layer whose q is wider than its v
    runs SDPA's memory-efficient kernel, not the math kernel the CPU runs; what it saves is within
    5% of the plan for a GPU (the kernel pads the mask and its log-sum-exp to its blocks)."""
    dtype = getattr(torch, compute)
    *_, batch, length = shape
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[-1, length - 5 :] = 0

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = transformers.DeepseekV3ForCausalLM(_config(shape, layers)).to(dtype).cuda()
        embedded = model.get_input_embeddings()(ids).detach().requires_grad_()
        run = lambda: model.model(inputs_embeds=embedded, attention_mask=mask, use_cache=False)  # noqa: E731
        return saved_bytes(run, [*model.parameters(), *model.buffers()])

    dims = Dims.from_config(_config(shape, 2).to_dict(), "base").on_device("cuda")
    dense = dims.layer_kinds()[0][0]  # the dense layers' kind
    planned = activations.layer_activation_bytes(dense, batch, length, dtype.itemsize)
    measured = saved(2) - saved(1)
    assert 0.95 * measured <= planned <= 1.05 * measured, (measured, planned)


def test_an_unprofiled_type_with_latent_attention_plans_it_and_says_so():
    """A model type not profiled whose config names a kv_lora_rank (DeepSeek-V2): its attention is
    planned as DeepSeek-V3's latent attention, and the plan's note says so."""
    from mergeopt.memory.dry_run import _profile_notes

    config = {**transformers.DeepseekV3Config().to_dict(), "model_type": "deepseek_v2"}
    dims = Dims.from_config(config, "base")
    assert dims.latent_attention is not None and dims.profile.grouped_router
    (note,) = _profile_notes(dims)
    assert "model type deepseek_v2 is not profiled" in note and "of DeepSeek-V3's kind" in note
    assert "of DeepSeek-V3's kind; its latent attention as DeepSeek-V3's (profiled: " in note
