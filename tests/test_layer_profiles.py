"""The activation estimate per architecture (mergeopt.memory.layer_profiles) against what autograd
saves, for every architecture family the plan profiles: whole forwards of the fit's per-layer merge
path (float32 and bfloat16), and one decoder layer's share with no weight gradient (LoRA experts
alone), measured as the difference between a 2-layer and a 1-layer model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers

from mergeopt.memory import activations, phases
from mergeopt.memory.layer_profiles import LLAMA, PROFILES, not_profiled_note, profile_for
from mergeopt.memory.sizes import Dims
from mergeopt.merging import layer_merge
from mergeopt.merging.stack import DTYPES
from mergeopt.merging.stacking import build_stack
from mergeopt.objectives.loss import dev_loss
from tests.test_plan import _stacked_tensors, padded_batch

VOCAB, BATCH, LENGTH = 300, 3, 40
_QWEN_MOE = dict(
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=48
)
# a gated DeltaNet layer, then a gated attention layer (Qwen 3.5's kinds), value heads repeating
# key heads
_LINEAR_ATTENTION = dict(
    layer_types=["linear_attention", "full_attention"],
    linear_num_key_heads=4,
    linear_key_head_dim=16,
    linear_num_value_heads=8,
    linear_value_head_dim=16,
)
# config class, model class, fields beyond the shared small shapes
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # per-head q/k norms
    # Llama's layer: Ministral 3, Granite (scalar multipliers), Seed-OSS
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", {}),
    # Qwen3's: EXAONE 4 (norms after the sublayers), Hunyuan dense
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {}),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),  # float32 norm weight
    "gemma2": (  # post-norms, eager attention with soft-capping
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    ),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),  # post-norms, per-head q/k norms
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),  # fused qkv and gate_up
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),  # norms after each sublayer, whole-width q/k norms
    # OLMo2's layer over sliding-window and full layers (two masks)
    "olmo3": (
        "Olmo3Config",
        "Olmo3ForCausalLM",
        dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    ),
    "smollm3": (  # Llama's layer, without rotary embedding in every fourth (here the second)
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        dict(pad_token_id=0, no_rope_layer_interval=2),
    ),
    # mixtures of experts (transformers' grouped_mm): top-2 of 8 experts, float32 renormalised
    # routing weights (Mixtral); experts narrower than the dense width, q/k norms (Qwen3-MoE)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True),
    ),
    # a shared expert beside the routed ones (Qwen2-MoE); whole-width q/k norms (OLMoE)
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=96
        ),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2)),
    # DeepSeek-V3's mixture of experts (a float32 router of sigmoid scores picking the top-k within
    # the best groups of experts, float32 routing weights, shared experts without a gate) after a
    # dense first layer, beside grouped-query attention: GLM-4.5 (rotary embedding over half of
    # each head), dots.llm1 (per-head q/k norms)
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, n_group=2, topk_group=1),
    ),
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
        ),
    ),
    # eager attention with sinks over sliding and full layers, float32 norm weights, biased
    # experts with a clamped SwiGLU, a softmax over the top-k router logits (GPT-OSS)
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]),
    ),
    # DeepSeek-V3's mixture of experts after a dense first layer, beside multi-head latent
    # attention (mergeopt.memory.latent_attention): q and k wider than v, so on a CPU SDPA runs its
    # math kernel
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=16,
            v_head_dim=8,
        ),
    ),
    # Gemma 4: norms in float32 with two scalars per row, per-head q/k norms and one without weight
    # over v, per-layer inputs, full-attention layers with heads twice as wide
    "gemma4_text": (
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        dict(
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            global_head_dim=32,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    # gated DeltaNet linear attention beside gated attention, Gemma's norms (Qwen 3.5), with a
    # mixture of experts and a gated shared expert (Qwen3.5-MoE, Qwen3-Next)
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _LINEAR_ATTENTION),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {**_LINEAR_ATTENTION, **_QWEN_MOE}),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {**_LINEAR_ATTENTION, **_QWEN_MOE}),
}


def tiny(arch: str, layers: int = 2, kinds: list[str] | None = None, **changes) -> torch.nn.Module:
    """A random model of ``arch``, with the attention transformers picks by default (as the fit's
    from_pretrained does): SDPA, or eager where the model has no SDPA path (Gemma2); ``kinds``:
    its layer_types in another order."""
    config_name, model_name, extra = ARCHITECTURES[arch]
    if "layer_types" in extra:  # one kind of layer per layer
        extra = {**extra, "layer_types": (kinds or extra["layer_types"])[:layers]}
    shapes = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    config = getattr(transformers, config_name)(**{**shapes, **extra, **changes})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def saved_bytes(run, skip: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``run()`` runs,
    parameters and stacked tensors left out. Each saved tensor is held until the end, so that one
    released during the forward (a branch without gradient: a grouped router's choice of experts)
    leaves no address for a later one to take and be counted as the same storage."""
    known = {t.untyped_storage().data_ptr() for t in skip}
    saved: dict[int, int] = {}
    held: list[torch.Tensor] = []

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in known:
            saved[key] = t.untyped_storage().nbytes()
            held.append(t)
        return t

    original = layer_merge._pack  # the per-layer merge packs its own saved tensors

    def merge_pack(t):
        packed = original(t)
        if isinstance(packed, torch.Tensor):
            pack(t)
        return packed

    layer_merge._pack = merge_pack
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        layer_merge._pack = original
    return sum(saved.values())


def test_every_architecture_family_of_the_layer_merge_matrix_is_profiled():
    """The architectures the per-layer merge is tested on (tests/test_layer_merge.py) are profiled,
    but GPT-2 (Conv1D and LayerNorm: estimated as Llama's, and the plan says so): a type not
    profiled whose config names routed experts (DeepSeek-V2, say) is estimated as a mixture of
    experts of Mixtral's kind, or of DeepSeek-V3's (GLM-4.5's profile) where it names groups of
    experts, and the plan says so."""
    from mergeopt.memory.layer_profiles import ROUTED
    from tests.test_layer_merge import ARCHITECTURES as MERGED

    assert set(MERGED) - {"gpt2"} <= set(PROFILES)
    assert set(ARCHITECTURES) == set(PROFILES)
    assert not_profiled_note("llama") is None
    note = not_profiled_note("gpt2")
    assert note is not None and "gpt2 is not profiled" in note and "Llama's" in note
    assert profile_for({"model_type": "gpt2"}) is LLAMA
    note = not_profiled_note("deepseek_v2", routed=True)
    assert note is not None and "deepseek_v2 is not profiled" in note and "of Mixtral's kind" in note
    assert profile_for({"model_type": "deepseek_v2", "n_routed_experts": 160}) is ROUTED
    note = not_profiled_note("deepseek_v2", routed=True, grouped=True)
    assert note is not None and "of DeepSeek-V3's kind" in note
    grouped = profile_for(
        {"model_type": "deepseek_v2", "n_routed_experts": 160, "n_group": 8, "topk_group": 3}
    )
    assert grouped.grouped_router and grouped.shared_expert == "plain"
    assert replace(grouped, attention_output_copies=2) == PROFILES["glm4_moe"]


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_saved_activations_of_each_architecture_equal_what_autograd_saves(arch, compute):
    """dev_loss with the chunked loss over four stacked experts: what autograd keeps (the per-layer
    merge's saved inputs included) equals saved_activation_bytes for the model's profile, within
    0.1%."""
    model, stack, dims = _stacked(arch, compute)
    # as profiled, with what the config sets: Gemma2's soft-capping, Qwen3-MoE's renormalisation
    # (norm_topk_prob), GPT-OSS's two kinds of layer
    profiled = PROFILES[arch]
    config_set = dict(attention_softcap=profiled.attention_softcap, router_renorm=profiled.router_renorm)
    assert replace(dims.profile, **config_set, mask_kinds=profiled.mask_kinds) == profiled
    measured, expected = _saved_and_planned(model, stack, dims, compute)
    assert measured == pytest.approx(expected, rel=0.001), (measured, expected, expected / measured)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [1, 4], ids=["one-key-head", "every-head"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "olmo2", "mixtral"])
def test_saved_activations_with_one_key_head_or_one_per_head(arch, kv_heads, compute):
    """As many key-and-value heads as heads (Phi-3-mini), or one (multi-query attention): k and v
    are not copied to every head (one head repeated is a view), and Phi3's v, a view of its fused
    q, k and v projection, keeps that projection's output whole; within 0.1%, as for every
    architecture (Phi3's was planned at 0.92x and 0.95x before)."""
    model, stack, dims = _stacked(arch, compute, num_key_value_heads=kv_heads)
    measured, expected = _saved_and_planned(model, stack, dims, compute)
    assert measured == pytest.approx(expected, rel=0.001), (measured, expected, expected / measured)


def _saved_and_planned(model, stack, dims: Dims, compute: str) -> tuple[int, int]:
    """(what autograd saves in dev_loss with the chunked loss over the stacked experts, what
    saved_activation_bytes plans for it), BATCH sequences of LENGTH tokens."""
    z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    data = padded_batch(BATCH, LENGTH, VOCAB)
    params = [*model.parameters(), *model.buffers(), *_stacked_tensors(stack), z]
    measured = saved_bytes(lambda: dev_loss(model, stack, z, data, torch.ones(1), 16), params)
    return measured, activations.saved_activation_bytes(dims, BATCH, LENGTH, DTYPES[compute].itemsize)


def test_the_profiles_hold_at_real_shapes_in_the_committed_benchmarks():
    """benchmarks/activations_at_real_shapes.py's committed results: for the profiled types whose
    layers change most with the shapes (latent and linear attention, Gemma 4's layers), the plan
    lies within 1.00x to 1.03x of what autograd saves at a released model's layer shapes on the
    CPU's kernels (over by the padding masks it always assumes, one per layer, where one sequence
    needs none: Gemma 4's layers of one kind then share theirs)."""
    import json

    from tests.conftest import REPO

    report = json.loads((REPO / "benchmarks" / "results" / "activations_at_real_shapes.json").read_text())
    measured = {(r["model_type"], r["dtype"]): r["ratio"] for r in report["rows"]}
    types = {"deepseek_v3", "gemma4_text", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"}
    assert {t for t, _ in measured} == types and types <= set(PROFILES)
    assert all(1 <= ratio <= 1.03 for ratio in measured.values()), measured


# each kind of a model's layers second: Qwen 3.5's gated DeltaNet layer after its attention layer
FROZEN = [*ARCHITECTURES, *(f"{a}-linear_second" for a in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"))]


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", FROZEN)
def test_one_frozen_layer_keeps_what_the_profile_says(arch, compute):
    """No weight gradient (LoRA experts alone: no layer weight merged): one decoder layer's saved
    bytes, the 2-layer model's less the 1-layer model's, equal layer_activation_bytes(frozen) for
    the second layer's kind."""
    arch, _, order = arch.partition("-")
    kinds = ["full_attention", "linear_attention"] if order else None
    dtype = DTYPES[compute]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, LENGTH - 7 :] = 0  # right padding, as the dev sets are batched

    def layer_bytes(layers: int) -> int:
        model = tiny(arch, layers, kinds).to(dtype)
        model.requires_grad_(False)
        embedded = model.get_input_embeddings()(ids).detach().requires_grad_()
        weights = [*model.parameters(), *model.buffers()]
        run = lambda: model.model(inputs_embeds=embedded, attention_mask=mask, use_cache=False)  # noqa: E731
        return saved_bytes(run, weights)

    def planned(layers: int) -> int:
        dims = Dims.from_config(tiny(arch, layers, kinds).config.to_dict(), arch).on_device("cpu")
        kept = sum(
            n * activations.layer_activation_bytes(k, BATCH, LENGTH, dtype.itemsize, frozen=True)
            for k, n in dims.layer_kinds()
        )
        # a second layer of another kind brings its own cos and sin where the model forms them per
        # kind of layer (OLMo3), and its per-layer input where the model has them (Gemma 4)
        kept += activations.per_layer_inputs_bytes(dims, BATCH, LENGTH, dtype.itemsize, frozen=True)
        return kept + activations.rotary_bytes(dims, LENGTH, dtype.itemsize, BATCH)

    assert layer_bytes(2) - layer_bytes(1) == planned(2) - planned(1)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_the_plan_notes_a_model_type_it_has_no_profile_for(tmp_path, arch):
    """`mergeopt plan` on config-only directories: a GPT-2 base is planned as a Llama layer and the
    plan's notes say so in one line; a profiled type (Qwen3) gets no note and its own profile."""
    from mergeopt.memory import dry_run
    from tests.test_plan import recipe

    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        config = tiny(arch).config
    config.save_pretrained(tmp_path / "base")
    noted = arch == "gpt2"
    base = str(tmp_path / "base")
    inventory, dims = dry_run.read_inventory(recipe(base, {"a": base, "b": base}))
    notes = [n for n in inventory.notes if n.startswith("activations:")]
    assert len(notes) == int(noted), inventory.notes
    if noted:
        assert f"model type {config.model_type} is not profiled" in notes[0]
        assert dims.profile is LLAMA
    else:
        assert dims.profile is PROFILES["qwen3"]


def _stacked(arch: str, compute: str, **changes):
    """``arch``'s tiny model (its config ``changes`` made) in the compute dtype with four perturbed
    experts stacked, and its dims."""
    model = tiny(arch, **changes)
    generator = torch.Generator().manual_seed(1)
    experts = {
        f"e{k}": {
            n: (t + 0.01 * torch.randn(t.shape, generator=generator)).to(torch.bfloat16)
            for n, t in model.state_dict().items()
        }
        for k in range(4)
    }
    model.to(DTYPES[compute])
    stack = build_stack(model, experts, (), DTYPES[compute], progress=False)
    return model, stack, Dims.from_config(model.config.to_dict(), arch).on_device("cpu")


@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_training_step_plan_bounds_the_live_bytes_of_each_architecture(arch, compute, checkpointed):
    """The plan's training step against the peak of live tensor bytes of dev_loss + backward, as
    tests/test_plan.py checks it on Llamas: 5% below to 15% above (measured 1.01x to 1.10x), at a
    length where eager attention's per-head weights and their backward matter (Gemma2)."""
    _training_step_ratio_holds(arch, compute, checkpointed)


def _training_step_ratio_holds(
    arch: str, compute: str, checkpointed: bool, bounds=(0.95, 1.15), batch=2, length=128, **changes
) -> None:
    """The plan's training step of ``arch`` (its config ``changes`` made) lies 5% below to 15%
    above (``bounds``) the live peak of dev_loss + backward over 2 sequences of 128 tokens."""
    from mergeopt.memory import checkpointing
    from tests.test_plan import LiveBytes, small_recipe

    model, stack, dims = _stacked(arch, compute, **changes)
    if checkpointed:
        checkpointing.enable(model)
    z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    with LiveBytes([*model.parameters(), *model.buffers(), *_stacked_tensors(stack), z]) as step:
        dev_loss(model, stack, z, padded_batch(batch, length, VOCAB), torch.ones(1), 64).backward()
    largest = max(t.numel() for t in stack.anchor.values())
    layer = sum(t.numel() for n, t in stack.anchor.items() if ".layers.0." in n)
    r = small_recipe(compute, compute, length, activation_checkpointing=checkpointed)
    planned = phases.training_bytes(r, dims, batch, largest, 4, DTYPES[compute].itemsize, layer, True)
    low, high = bounds
    assert step.peak * low <= planned <= step.peak * high, (planned, step.peak, planned / step.peak)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch,length", [(4, 60), (2, 128)])
def test_evaluation_plan_of_eager_attention_bounds_the_live_bytes(compute, batch, length):
    """Gemma2's eager attention in a no-grad evaluation batch: every head's scores at the softmax
    (input upcast and float32 output), the float masks of its two kinds of layer, and the
    attention weights each layer holds through its MLP; within 15% either way of the live peak,
    as for Llama (measured 0.92x to 1.04x)."""
    planned, peak = _evaluation_bytes("gemma2", compute, batch, length)
    assert peak * 0.85 <= planned <= peak * 1.15, planned / peak


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "arch", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "glm4_moe", "dots1", "deepseek_v3"]
)
def test_evaluation_plan_of_a_mixture_of_experts_bounds_the_live_bytes(arch, compute):
    """A mixture of experts' no-grad evaluation batch: grouped_mm reads each fused expert weight
    whole, merged, while the routed copies' working set is alive (4 x 60 tokens, where the SDPA
    mask term, which over-plans small batches of any model, is small): measured 1.01x to 1.09x;
    tested 5% below to 15% above, as the training step."""
    planned, peak = _evaluation_bytes(arch, compute, 4, 60)
    assert peak * 0.95 <= planned <= peak * 1.15, planned / peak


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch,length", [(4, 60), (2, 200)])
@pytest.mark.parametrize("arch", ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"])
def test_evaluation_plan_of_linear_attention_bounds_the_live_bytes(arch, batch, length, compute):
    """A gated DeltaNet model's no-grad evaluation batch: the chunk algorithm's float32 working
    set (mergeopt.memory.linear_attention), one chunk and four: within 15% either way of the live
    peak, as for eager attention (measured 0.92x to 0.99x)."""
    planned, peak = _evaluation_bytes(arch, compute, batch, length)
    assert peak * 0.85 <= planned <= peak * 1.15, planned / peak


# Gemma 4 26B-A4B's kind: a mixture-of-experts block beside the dense MLP
GEMMA4_MOE_BLOCK = dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch,length", [(4, 60), (2, 128), (2, 200)])
@pytest.mark.parametrize("moe", [False, True], ids=["mlp", "mlp-and-experts"])
def test_evaluation_plan_of_gemma4_bounds_the_live_bytes(moe, batch, length, compute):
    """Gemma 4's no-grad evaluation batch: a layer's working set (with a mixture-of-experts block,
    the routed copies' moments beside the dense MLP's output) beside the per-layer inputs and the
    keys and values each kind of layer stores for the layers that read them, alive through the
    forward: within 15% either way of the live peak, as for eager attention (measured 0.98x to
    1.13x)."""
    changes = GEMMA4_MOE_BLOCK if moe else {}
    planned, peak = _evaluation_bytes("gemma4_text", compute, batch, length, **changes)
    assert peak * 0.85 <= planned <= peak * 1.15, planned / peak


@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_training_step_plan_bounds_the_live_bytes_of_gemma4_with_experts(compute, checkpointed):
    """Gemma 4 with a mixture-of-experts block beside its MLP: the training step as for every
    architecture (measured 1.00x to 1.02x at 2 x 128 tokens)."""
    _training_step_ratio_holds("gemma4_text", compute, checkpointed, **GEMMA4_MOE_BLOCK)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch,length", [(2, 128), (4, 60)])
@pytest.mark.parametrize("moe", [False, True], ids=["mlp", "mlp-and-experts"])
def test_checkpointed_gemma4_step_plans_its_output_norms_backward(moe, batch, length, compute):
    """A recomputed Gemma 4 layer's first backward is its output norm's (after the per-layer
    input), with every activation of the layer alive: the step's peak. Planned, the step is at
    least that peak and within 5% of it (measured 1.00x to 1.02x; 0.96x to 0.97x before)."""
    changes = GEMMA4_MOE_BLOCK if moe else {}
    _training_step_ratio_holds("gemma4_text", compute, True, (0.99, 1.05), batch, length, **changes)


def _evaluation_bytes(arch: str, compute: str, batch: int, length: int, **changes) -> tuple[int, int]:
    """(planned, live peak) of one evaluation batch of ``arch`` (its config ``changes`` made) with
    four stacked experts."""
    from mergeopt.objectives.data import DevSet, Example
    from mergeopt.objectives.loss import evaluate_sums
    from tests.test_plan import LiveBytes, small_recipe

    model, stack, dims = _stacked(arch, compute, **changes)
    if arch == "gemma2":
        assert dims.profile.eager and dims.profile.mask_kinds == 2
    stack.eval_dtype = DTYPES[compute]
    data = padded_batch(batch, length, VOCAB)
    examples = [
        Example(input_ids=row[row != 0], scored=s[row != 0]) for row, s in zip(data.input_ids, data.scored)
    ]
    sets = [DevSet(name="a", weight=1.0, fit=examples, heldout=[])]
    with LiveBytes([*model.parameters(), *model.buffers(), *_stacked_tensors(stack)]) as evaluation:
        evaluate_sums(model, stack, torch.full((4,), 0.25), sets, "fit", batch, 0, torch.device("cpu"), 64)
    largest = max(t.numel() for t in stack.anchor.values())
    c = DTYPES[compute].itemsize
    r = small_recipe(compute, compute, length, eval_batch_size=batch)
    return phases.evaluation_bytes(r, dims, largest, 4, c, evaluate=c), evaluation.peak
