"""The per-layer merge against the whole-model reference, across the architectures users fine-tune.

Reference: a plain copy of the base model run by ``functional_call`` with every stacked parameter
replaced by ``stack.merged(w)`` (the whole merged model, as mergeopt computed it before the
per-layer merge), its own logits and ``F.cross_entropy``. New path: the model whose stacked
parameters merge when their module runs, w handed to the mixture buffers, the chunked loss, with
and without activation checkpointing. Loss and ∂L/∂z must agree to 1e-6 in float32, and ∂L/∂z must
match central finite differences. The fitted w of the gradient strategy must equal a reference
Adam loop on the whole-model merge. Mixture-of-experts models (Mixtral, Qwen3-MoE, Qwen2-MoE with
its shared expert, OLMoE, GPT-OSS with biased experts, DeepSeek-V3 with latent attention) hold each
projection of their experts as one fused (experts, out, in) parameter, merged as one tensor; their
top-k routing makes the loss a step function where a token changes experts, so their finite
differences are taken where no token does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers
from torch.func import functional_call

from mergeopt.config import MergeSection, OptimSection
from mergeopt.memory import checkpointing
from mergeopt.merging.stacking import build_stack
from mergeopt.objectives.data import Batch, DevSet, Example
from mergeopt.objectives.head_loss import full_logits_losses
from mergeopt.objectives.loss import per_set_loss_sums, target_loss
from mergeopt.search.gradient import fit_gradient

VOCAB = 61
SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
)

# one tiny random checkpoint per architecture family mergeopt is used with
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=8)),  # q/k norms
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=4)),
    "gemma2": (  # tied embeddings, final logit soft-capping, attention soft-capping
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),  # fused qkv
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),  # post-norms
    "olmo3": (  # OLMo2's layer over sliding-window and full layers, rotary parameters per kind
        "Olmo3Config",
        "Olmo3ForCausalLM",
        dict(num_key_value_heads=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    ),
    "smollm3": (  # Llama's layer, without rotary embedding in every fourth (here the second)
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        dict(num_key_value_heads=2, pad_token_id=0, no_rope_layer_interval=2),
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict()),  # Conv1D, learned positions, tied
    "gemma4_text": (  # per-layer input embeddings, v norms, wider heads in its full layers, tied
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            global_head_dim=16,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=4,
        ),
    ),
    "qwen3_5_text": (  # gated DeltaNet linear attention beside gated full attention
        "Qwen3_5TextConfig",
        "Qwen3_5ForCausalLM",
        dict(
            num_key_value_heads=2,
            head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
    ),
    # mixture-of-experts: top-2 routing over fused (experts, out, in) weights, one 3-D parameter each
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24
        ),
    ),
    "qwen2_moe": (  # a shared expert beside the routed ones, with its own sigmoid gate
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    ),
    "gpt_oss": (  # biased, interleaved gate and up, clamped SwiGLU; attention sinks
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "deepseek_v3": (  # latent attention (MLA), grouped sigmoid routing, a shared expert, a dense first layer
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
    # DeepSeek-V3's mixture of experts beside grouped-query attention, rotary over half of each head
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            num_key_value_heads=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_group=2,
            topk_group=1,
            use_qk_norm=True,
        ),
    ),
}
MOE = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "deepseek_v3", "glm4_moe")
# a decisive router, as trained ones are (see tiny_model); per model, chosen so that the finite
# differences' steps keep every token's experts, which finite_differences checks
ROUTER_GAIN = {"qwen2_moe": 5.0}
DEFAULT_ROUTER_GAIN = 20.0


def tiny_model(arch: str, seed: int = 0, experts_implementation: str | None = None) -> torch.nn.Module:
    """``experts_implementation`` (mixture-of-experts only): transformers' default is ``grouped_mm``,
    one read of each fused expert weight; ``eager`` loops over the experts, reading it once each."""
    config_name, model_name, extra = ARCHITECTURES[arch]
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2
        )
    else:
        config = getattr(transformers, config_name)(**SMALL, max_position_embeddings=32, **extra)
    config._attn_implementation = "eager"
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with (
        torch.no_grad()
    ):  # a decisive router, as trained ones are: wide margins between its top-k and the rest
        for router in routers(model):
            router.weight.mul_(ROUTER_GAIN.get(arch, DEFAULT_ROUTER_GAIN))
    return model


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A mixture-of-experts model's top-k routers (none in a dense model)."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]


@contextmanager
def routing_recorded(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The experts each router picks for each token, in call order, while the block runs."""
    picked: list[torch.Tensor] = []

    def record(module, inputs, out):  # the set of experts per token (DeepSeek-V3's top-k is unsorted)
        picked.append(out[2].sort(dim=-1).values)

    hooks = [r.register_forward_hook(record) for r in routers(model)]
    try:
        yield picked
    finally:
        for hook in hooks:
            hook.remove()


def perturbed_experts(model: torch.nn.Module, count: int = 3, scale: float = 0.05) -> dict[str, dict]:
    """Each parameter plus seeded noise; a router's (mixture-of-experts) at a tenth of the scale,
    as fine-tuning moves a router little, so that most tokens keep their experts across the
    mixtures a test visits (a token that changes experts is a step in the loss)."""
    gen = torch.Generator().manual_seed(7)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    gates = {
        f"{n}.{p}" for n, m in model.named_modules() if m in routers(model) for p, _ in m.named_parameters()
    }
    return {
        f"e{i}": {
            n: params[n].detach()
            + scale * (0.1 if n in gates else 1.0) * torch.randn(params[n].shape, generator=gen)
            for n in names
        }
        for i in range(count)
    }


def padded_batch(seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    scored = mask.bool().clone()
    scored[:, :3] = False  # a prompt that is not scored
    return Batch(input_ids=ids, attention_mask=mask, scored=scored, set_index=torch.tensor([0, 1, 1]))


def reference_loss(plain: torch.nn.Module, stack, weights: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The whole-model merge through the model's own logits."""
    merged = stack.merged(weights)
    targets = batch.input_ids[:, 1:].masked_fill(~batch.scored[:, 1:], -100)

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = plain

        def forward(self):
            return full_logits_losses(self.model, batch.input_ids, batch.attention_mask, targets)

    token = functional_call(Loss(), {f"model.{k}": v for k, v in merged.items()}, args=())
    scored = batch.scored[:, 1:]
    sums = token.new_zeros(2).index_add(0, batch.set_index, token.sum(1))
    counts = token.new_zeros(2).index_add(0, batch.set_index, scored.sum(1).to(token.dtype))
    return target_loss(sums, counts, torch.tensor([1.0, 2.0]))


def per_layer_loss(model, stack, weights, batch, chunk):
    sums, counts = per_set_loss_sums(model, stack.mix_params(weights), batch, 2, chunk)
    return target_loss(sums, counts, torch.tensor([1.0, 2.0]))


def loss_and_grad(fn, logits):
    z = logits.clone().requires_grad_(True)
    loss = fn(torch.softmax(z, 0))
    loss.backward()
    return float(loss), z.grad


def _built(arch: str, merge: MergeSection | None = None, dtype=torch.float32):
    base = tiny_model(arch)
    experts = perturbed_experts(base)
    plain = copy.deepcopy(base)
    stack = build_stack(base, experts, dtype=dtype, progress=False, merge=merge, seed=3)
    return base, plain, stack


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_per_layer_path_equals_the_whole_model_merge(arch):
    """Loss and ∂L/∂z: chunked loss with and without checkpointing vs the reference, and vs finite differences."""
    base, plain, stack = _built(arch)
    assert stack.deltas, "every parameter was perturbed: all must be stacked"
    if arch in ("gemma2", "gpt2", "gemma4_text"):  # tied: the output layer reads the embedding's merge
        assert (
            base.get_output_embeddings().parametrizations.weight[0]
            is (base.get_input_embeddings().parametrizations.weight[0])
        )
    batch = padded_batch()
    logits = torch.tensor([0.3, -0.4, 0.2], dtype=torch.float64)
    want_loss, want_grad = loss_and_grad(lambda w: reference_loss(plain, stack, w, batch), logits)
    for chunk, checkpointed in [(None, False), (5, False), (5, True), (None, True)]:
        (checkpointing.enable if checkpointed else checkpointing.disable)(base)
        got_loss, got_grad = loss_and_grad(
            lambda w, c=chunk: per_layer_loss(base, stack, w, batch, c), logits
        )
        assert abs(got_loss - want_loss) <= 1e-6 * max(1.0, abs(want_loss)), (chunk, checkpointed)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5, msg=f"{chunk} {checkpointed}")
    checkpointing.disable(base)
    torch.testing.assert_close(
        want_grad, finite_differences(base, stack, logits, batch), atol=1e-4, rtol=1e-2
    )


def finite_differences(base, stack, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Central finite differences of the per-layer loss in the logits z, one coordinate at a time.

    The loss (about 4) is formed in float32: its rounding (~5e-7) over a step of 2·eps is the
    differences' noise, so a step of 1e-3 leaves a few 1e-4 of noise, as large as some gradients;
    at 1e-2 a few 1e-5, and the truncation error (eps² times the third derivative, / 6) smaller
    still. A mixture-of-experts loss is smooth only while every token keeps its experts (top-k
    routing is a step function of w), so a coordinate whose ±1e-2 points route a token elsewhere
    is taken at the largest of 5e-3, 2.5e-3 with the same routing as at z (the noise grows as
    1/eps; the caller's tolerance covers 2.5e-3). Dense models route nothing: always 1e-2."""

    def loss_and_routing(z):
        with torch.no_grad(), routing_recorded(base) as picked:
            return float(per_layer_loss(base, stack, torch.softmax(z, 0), batch, 5)), picked

    _, centre = loss_and_routing(logits)
    fd = []
    for e in torch.eye(len(logits), dtype=torch.float64):
        for eps in (1e-2, 5e-3, 2.5e-3):
            (up, up_routes), (down, down_routes) = (loss_and_routing(logits + s * eps * e) for s in (1, -1))
            same = [
                torch.equal(a, c) and torch.equal(b, c) for a, b, c in zip(up_routes, down_routes, centre)
            ]
            if all(same) and len(up_routes) == len(centre):
                fd.append((up - down) / (2 * eps))
                break
        else:
            raise AssertionError("every step of the finite differences changes a token's experts")
    return torch.tensor(fd, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "mixtral"])
def test_one_hot_weights_reproduce_each_expert(arch):
    base = tiny_model(arch)
    experts = perturbed_experts(base)
    plain = copy.deepcopy(base)
    stack = build_stack(base, experts, progress=False)
    ids = padded_batch().input_ids
    for i, state in enumerate(experts.values()):
        plain.load_state_dict(state, strict=False)
        with torch.no_grad():
            want = plain(input_ids=ids).logits
            got = functional_call(base, stack.mix_params(torch.eye(3)[i]), args=(ids,)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "merge",
    [
        MergeSection(method="ties", scale=1.5, density=0.5),
        MergeSection(method="dare_linear", density=0.6),
        MergeSection(method="dare_ties", density=0.6, scale=1.2),
        MergeSection(method="linear", scale=0.8, mixup_alpha=0.7),
    ],
    ids=["ties", "dare_linear", "dare_ties", "mixup"],
)
def test_every_merge_method_takes_the_per_layer_path(merge):
    base, plain, stack = _built("llama", merge)
    batch = padded_batch(1)
    logits = torch.tensor([0.1, 0.5, -0.3], dtype=torch.float64)
    want = loss_and_grad(lambda w: reference_loss(plain, stack, w, batch), logits)
    checkpointing.enable(base)
    got = loss_and_grad(lambda w: per_layer_loss(base, stack, w, batch, 4), logits)
    assert abs(got[0] - want[0]) <= 1e-6 * max(1.0, abs(want[0]))
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "arch,dtype", [("qwen2", torch.int8), ("qwen2", torch.bfloat16), ("mixtral", torch.int8)]
)
def test_compressed_stacks_merge_per_layer_as_their_reference(arch, dtype):
    """An int8 (or bfloat16) stack: the per-layer path equals the whole-model merge of the same
    stack (Mixtral: fused expert weights with one scale per expert and output channel)."""
    base, plain, stack = _built(arch, dtype=dtype)
    if dtype == torch.int8:
        assert all(d.dtype == torch.int8 for d in stack.deltas.values()) and stack.scales
    batch = padded_batch(2)
    logits = torch.tensor([0.2, 0.1, -0.2], dtype=torch.float64)
    want = loss_and_grad(lambda w: reference_loss(plain, stack, w, batch), logits)
    got = loss_and_grad(lambda w: per_layer_loss(base, stack, w, batch, 7), logits)
    assert abs(got[0] - want[0]) <= 1e-6 * max(1.0, abs(want[0]))
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("levels", [127, 7], ids=["int8", "4-bit values"])
def test_int8_differences_stay_close_to_float32(levels):
    """Per-row int8 differences: each dequantised row within half a quantisation step of the truth,
    the row's largest |δ| exact, and |q| within the levels asked for (7: benchmarks' int4 values)."""
    from mergeopt.merging.int8_rows import dequantize_rows, quantize_rows

    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 40, 24, generator=gen) * torch.rand(3, 40, 1, generator=gen)
    deltas[1, 5] = 0.0  # a row an expert did not change: scale 0, exact zeros back
    q, scale = quantize_rows(deltas, levels=levels)
    back = dequantize_rows(q, scale)
    assert q.dtype == torch.int8 and scale.shape == (3, 40)
    assert int(q.abs().max()) == levels
    torch.testing.assert_close(scale, deltas.abs().amax(dim=2) / levels)
    assert ((back - deltas).abs() <= scale[..., None] / 2 + 1e-7).all()
    assert torch.equal(back[1, 5], torch.zeros(24))
    fused = torch.randn(2, 4, 6, 5, generator=gen)  # (experts, out, in) mixture-of-experts weights
    fused[0, 1] *= 100.0  # one expert of the MoE layer moved far more: its rows alone get wide steps
    qf, sf = quantize_rows(fused, levels=levels)
    assert sf.shape == (2, 24)  # one scale per (expert, output channel), not per expert
    torch.testing.assert_close(sf, fused.abs().amax(dim=3).reshape(2, 24) / levels)
    assert ((dequantize_rows(qf, sf) - fused).abs() <= sf.reshape(2, 4, 6, 1) / 2 + 1e-6).all()
    vector = torch.randn(2, 17, generator=gen)  # 1-D parameters: one scale per expert
    q1, s1 = quantize_rows(vector)
    assert s1.shape == (2, 1)
    torch.testing.assert_close(dequantize_rows(q1, s1), vector, atol=float(s1.max()) / 2, rtol=0)


def _dev_sets(seed: int) -> list[DevSet]:
    gen = torch.Generator().manual_seed(seed)

    def examples(n):
        out = []
        for _ in range(n):
            ids = torch.randint(3, VOCAB, (10,), generator=gen)
            scored = torch.ones(10, dtype=torch.bool)
            scored[:2] = False
            out.append(Example(ids, scored))
        return out

    return [DevSet(f"s{i}", 1.0, examples(12), examples(4)) for i in range(2)]


def test_fitted_weights_equal_a_reference_adam_loop_on_the_whole_model_merge():
    """fit_gradient through the per-layer path (checkpointed, chunked loss) vs Adam on the whole merge."""
    base, plain, stack = _built("llama")
    checkpointing.enable(base)
    sets = _dev_sets(5)
    set_weights = torch.tensor([1.0, 1.0])
    optim = OptimSection(lr=0.2, steps=6, batch_size=3, eval_every=100, patience=5)
    z0 = torch.zeros(3, dtype=torch.float64)
    result = fit_gradient(
        base,
        stack,
        sets,
        set_weights,
        optim,
        z0,
        0,
        0,
        torch.device("cpu"),
        progress=False,
        loss_chunk=6,
    )
    from mergeopt.objectives.data import training_batches

    z = z0.clone().requires_grad_(True)
    adam = torch.optim.Adam([z], lr=optim.lr)
    batches = training_batches(sets, [0, 1], optim.batch_size, 0, 0)
    for _ in range(optim.steps):
        batch = next(batches)
        adam.zero_grad()
        merged = stack.merged(torch.softmax(z, 0))
        targets = batch.input_ids[:, 1:].masked_fill(~batch.scored[:, 1:], -100)

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = plain

            def forward(self, b=batch, t=targets):
                return full_logits_losses(self.model, b.input_ids, b.attention_mask, t)

        token = functional_call(Loss(), {f"model.{k}": v for k, v in merged.items()}, args=())
        sums = token.new_zeros(2).index_add(0, batch.set_index, token.sum(1))
        counts = token.new_zeros(2).index_add(0, batch.set_index, batch.scored[:, 1:].sum(1).to(token.dtype))
        target_loss(sums, counts, set_weights).backward()
        adam.step()
    torch.testing.assert_close(result.logits, z.detach(), atol=1e-6, rtol=0)
    assert result.steps_run == optim.steps


def counting_recipes(monkeypatch) -> tuple[list, list]:
    """(the recipes, the tensors) the per-layer merge's saved-tensor hook stores from now on: it is
    wrapped to count them."""
    from mergeopt.merging import layer_merge

    recipes, kept = [], []
    original = layer_merge._pack

    def counting_pack(tensor):
        packed = original(tensor)
        (recipes if isinstance(packed, layer_merge._Recompute) else kept).append(packed)
        return packed

    monkeypatch.setattr(layer_merge, "_pack", counting_pack)
    return recipes, kept


def test_no_merged_copy_of_the_model_is_saved_for_the_backward(monkeypatch):
    """Autograd keeps a recipe, not the tensor, for every merged weight a module saves: counted by
    wrapping the per-layer merge's own saved-tensor hook during one forward."""
    from mergeopt.merging import layer_merge

    base, _, stack = _built("llama")
    recipes, kept = counting_recipes(monkeypatch)
    w = torch.softmax(torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64, requires_grad=True), 0)
    loss = per_layer_loss(base, stack, w, padded_batch(), None)
    merged_bytes = sum(r.source.anchor.numel() * 4 for r in recipes)
    # every weight matrix a matmul uses became a recipe (an embedding saves its indices, not its weight)
    matrices = [n for n, a in stack.anchor.items() if a.dim() == 2 and "embed_tokens" not in n]
    assert len(recipes) >= len(matrices)
    assert merged_bytes >= sum(stack.anchor[n].numel() * 4 for n in matrices)
    assert not any(getattr(t, layer_merge.SOURCE_ATTRIBUTE, None) is not None for t in kept)
    loss.backward()  # the recipes merge again in the backward
    assert w.grad is None and loss.grad_fn is not None


@pytest.mark.parametrize("arch", MOE)
def test_mixture_of_experts_merges_each_fused_weight_once_per_forward(arch, monkeypatch):
    """transformers' default experts implementation (grouped_mm) reads each fused (experts, out, in)
    weight once, so a forward merges it once: scoring a candidate costs one forward and one merge
    of each weight, as for a dense model. Its eager and batched_mm implementations give the same loss
    and ∂L/∂z (eager reads the weight once per routed expert, so it merges it that many times)."""
    from mergeopt.merging import layer_merge

    merges = []  # the anchor of each merge formed
    original = layer_merge.merge_value
    monkeypatch.setattr(layer_merge, "merge_value", lambda *a, **k: merges.append(a[1]) or original(*a, **k))
    batch, logits = padded_batch(), torch.tensor([0.3, -0.4, 0.2], dtype=torch.float64)
    results = {}
    for implementation in ("grouped_mm", "eager", "batched_mm"):
        base = tiny_model(arch, experts_implementation=implementation)
        stack = build_stack(base, perturbed_experts(base), progress=False)
        merges.clear()
        with torch.no_grad():
            per_layer_loss(base, stack, torch.softmax(logits, 0), batch, 5)
        if implementation == "grouped_mm":
            fused = [a for a in stack.anchor.values() if a.dim() == 3]
            assert fused and all(sum(m.data_ptr() == a.data_ptr() for m in merges) == 1 for a in fused)
        results[implementation] = loss_and_grad(
            lambda w, m=base, s=stack: per_layer_loss(m, s, w, batch, 5), logits
        )
    for implementation in ("eager", "batched_mm"):
        loss, grad = results[implementation]
        assert abs(loss - results["grouped_mm"][0]) <= 1e-6 * abs(loss)
        torch.testing.assert_close(grad, results["grouped_mm"][1], atol=1e-6, rtol=1e-5)
