"""The low-rank path for LoRA experts against the dense path and PEFT itself.

References: (1) the dense merge of the same experts (PEFT's merge_and_unload per expert, stacked by
``build_stack``): logits and dw-gradients must agree at every mixture; (2) PEFT's own adapter model:
a one-hot mixture must give its logits; (3) central finite differences in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call
from transformers import LlamaForCausalLM

from mergeopt.errors import UserError
from mergeopt.loading.lora import read_adapter
from mergeopt.merging.lowrank import build_lowrank_stack
from mergeopt.merging.mixed_experts import build_expert_stack
from mergeopt.merging.stacking import build_stack
from tests.conftest import tiny_config

NAMES = ("alpha", "beta", "gamma")
# different ranks, alphas, scalings and target modules per expert: the stack must handle all
LORA = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "beta": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    "gamma": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
}
TOKENS = torch.randint(4, 50, (3, 12), generator=torch.Generator().manual_seed(0))


# the same experts with what PEFT adds to LoRA: DoRA, a saved lm_head, an adapted embedding (their
# parameters stacked densely, the rest kept low-rank)
DENSE_UPDATES = {
    "alpha": dict(LORA["alpha"], use_dora=True),
    "beta": dict(LORA["beta"], modules_to_save=["lm_head"]),
    "gamma": dict(LORA["gamma"], target_modules=[*LORA["gamma"]["target_modules"], "embed_tokens"]),
}


def make_world(root, lora=None, base=None):
    """A base (``base``, or a tiny Llama), three PEFT LoRA experts saved under ``root`` and read
    back, and their dense merges (``lora``: the experts' configs, :data:`LORA` by default)."""
    lora = lora or LORA
    torch.manual_seed(0)
    base = base if base is not None else LlamaForCausalLM(tiny_config()).eval()
    adapters, dense, peft_models = {}, {}, {}
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    for i, name in enumerate(NAMES):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(
            copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora[name])
        ).eval()
        with torch.no_grad():  # DoRA magnitudes and a saved lm_head start at the base's values: move them
            for p_name, p in peft_model.named_parameters():
                if "magnitude" in p_name or "modules_to_save" in p_name:
                    p.add_(0.05 * torch.randn_like(p))
        peft_model.save_pretrained(root / name)
        peft_models[name] = peft_model
        adapters[name] = read_adapter(root / name, shapes)
        merged = copy.deepcopy(peft_model).merge_and_unload()
        dense[name] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return base, adapters, dense, peft_models


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("lowrank"))


def _paths(world, dtype=torch.float32):
    base, adapters, dense, _ = world
    dense_model = copy.deepcopy(base).to(dtype)
    stack = build_stack(
        dense_model, {n: {k: v.to(dtype) for k, v in d.items()} for n, d in dense.items()}, progress=False
    )
    lowrank_model = copy.deepcopy(base).to(dtype)
    lowrank = build_lowrank_stack(list(NAMES), adapters, "cpu", dtype)
    lowrank.attach(lowrank_model)
    return dense_model, stack, lowrank_model, lowrank


def _dense_logits(model, stack, w):
    return functional_call(model, stack.mix_params(w), args=(), kwargs={"input_ids": TOKENS}).logits


def _lowrank_logits(model, lowrank, w):
    return functional_call(model, lowrank.params(w), args=(), kwargs={"input_ids": TOKENS}).logits


@pytest.mark.parametrize("w", [[1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
def test_lowrank_logits_equal_the_dense_merge(world, w):
    dense_model, stack, lowrank_model, lowrank = _paths(world)
    w = torch.tensor(w)
    with torch.no_grad():
        torch.testing.assert_close(
            _lowrank_logits(lowrank_model, lowrank, w),
            _dense_logits(dense_model, stack, w),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("j", range(3))
def test_one_hot_mixture_gives_peft_adapter_logits(world, j):
    _, _, lowrank_model, lowrank = _paths(world)
    peft_model = world[3][NAMES[j]]
    with torch.no_grad():
        ours = _lowrank_logits(lowrank_model, lowrank, torch.eye(3)[j])
        theirs = peft_model(input_ids=TOKENS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _loss(logits):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1)
    )


def test_gradients_to_w_match_the_dense_path_and_finite_differences(world):
    dense_model, stack, lowrank_model, lowrank = _paths(world, torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64, requires_grad=True)
    (g_lowrank,) = torch.autograd.grad(_loss(_lowrank_logits(lowrank_model, lowrank, w)), w)
    assert (g_lowrank.abs() > 0).all()
    # the dense anchor form θ_1 + Σ_{i≥2} w_i (θ_i − θ_1) has no w_1: it is the same function on the
    # simplex, so the gradients agree along the simplex (and through the logits z: w = softmax(z))
    z = torch.log(w.detach()).requires_grad_(True)
    (gz_lowrank,) = torch.autograd.grad(
        _loss(_lowrank_logits(lowrank_model, lowrank, torch.softmax(z, 0))), z
    )
    (gz_dense,) = torch.autograd.grad(_loss(_dense_logits(dense_model, stack, torch.softmax(z, 0))), z)
    # the dense experts were merged by PEFT in float32, so they carry float32 rounding: 1e-5, not 1e-12
    torch.testing.assert_close(gz_lowrank, gz_dense, rtol=1e-5, atol=1e-8)
    eps = 1e-3  # Llama's rotary embedding runs in float32 even in a float64 model: no smaller steps
    with torch.no_grad():
        for k in range(3):
            e = torch.zeros(3, dtype=torch.float64)
            e[k] = eps
            fd = (
                _loss(_lowrank_logits(lowrank_model, lowrank, w.detach() + e))
                - _loss(_lowrank_logits(lowrank_model, lowrank, w.detach() - e))
            ) / (2 * eps)
            assert float(fd) == pytest.approx(float(g_lowrank[k]), rel=1e-4, abs=1e-7)


def test_buffers_carry_the_mixture_to_plain_forward_calls(world):
    """model.generate (metrics) calls the model directly: the buffers must hold w then."""
    _, _, lowrank_model, lowrank = _paths(world)
    w = torch.tensor([0.2, 0.2, 0.6])
    with torch.no_grad():
        functional = _lowrank_logits(lowrank_model, lowrank, w)
        lowrank.params(w, write_buffers=True)
        plain = lowrank_model(input_ids=TOKENS).logits
    torch.testing.assert_close(plain, functional, atol=0, rtol=0)


def test_memory_is_the_factors_only(world):
    base, adapters, _, _ = world
    lowrank = build_lowrank_stack(list(NAMES), adapters, "cpu")
    shapes = {n: p.shape for n, p in base.named_parameters()}
    expected = 0
    for target in {t for a in adapters.values() for t in a.factors}:
        out_features, in_features = shapes[target]
        rank = sum(a.factors[target].rank for a in adapters.values() if target in a.factors)
        expected += rank * (in_features + out_features) * 4 + rank * (8 + 4)  # factors, owner, scaling
    assert lowrank.nbytes() == expected
    dense = sum(shapes[t].numel() for t in {t for a in adapters.values() for t in a.factors}) * 4 * 3
    assert lowrank.nbytes() < dense
    # and the model's own parameters are untouched: the update lives in the hooks
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lowrank.attach(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dense_names", [(), ("alpha",)], ids=["lora", "lora+dense"])
def test_lora_and_mixed_experts_take_the_per_layer_step(world, dense_names):
    """The fit's step (chunked loss, with and without checkpointed layers) over LoRA experts kept
    low-rank, alone or beside a dense expert, against the whole-model merge of the same experts
    made dense by PEFT through the model's own logits: loss and ∂L/∂z."""
    stack = _per_layer_step_matches(world, dense_names)
    assert len(stack.lowrank.modules) > 0 and bool(stack.deltas) == bool(dense_names)


# embedding LoRA on every expert, over a model whose output layer is tied to the embedding
EMBEDDINGS = {n: dict(LORA[n], target_modules=[*LORA[n]["target_modules"], "embed_tokens"]) for n in NAMES}


@pytest.mark.parametrize("dense_names", [(), ("alpha",)], ids=["lora", "lora+dense"])
def test_tied_embedding_lora_stays_low_rank_in_the_per_layer_step(tmp_path, dense_names):
    """SmolLM2 and Gemma tie lm_head to the input embedding, and PEFT's merge of an embedding LoRA
    changes the shared weight, so both layers. Kept low-rank, the embedding adds its factors' rows
    and the tied output layer the same factors' update, through the model's logits and through
    the chunked loss (which reads lm_head's weight): loss and ∂L/∂z as the step above checks. Beside
    a dense expert the shared weight is stacked too, and both layers read its merge and the update."""
    base = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    stack = _per_layer_step_matches(make_world(tmp_path, EMBEDDINGS, base), dense_names)
    assert stack.lowrank.tied == {"lm_head": "model.embed_tokens"}
    assert "model.embed_tokens" in stack.lowrank.modules
    assert ("model.embed_tokens.weight" in stack.deltas) == bool(dense_names)
    if dense_names:
        return
    # a PEFT adapter of the embedding would change the input's rows only: --as-adapter refuses
    from mergeopt.export.adapter import adapter_tensors

    with pytest.raises(UserError, match="model.embed_tokens is adapted and lm_head is tied to it"):
        adapter_tensors(stack, torch.tensor([0.2, 0.3, 0.5]), torch.float32)


def test_scaled_embedding_lora_stays_low_rank(tmp_path):
    """Gemma 3's embedding module multiplies its rows by √width (and its lm_head is tied): the
    low-rank rows are scaled as the merged weight's would be, so the logits at w are those of the
    whole-model merge of PEFT's merged experts."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=tiny_config().vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    base = transformers.Gemma3ForCausalLM(config).eval()
    assert type(base.get_input_embeddings()) is not torch.nn.Embedding  # the scaled one
    _, adapters, dense, _ = make_world(tmp_path, EMBEDDINGS, base)
    lowrank_model, reference_model = copy.deepcopy(base), copy.deepcopy(base)
    stack = build_expert_stack(lowrank_model, list(NAMES), {}, adapters, progress=False)
    reference = build_stack(reference_model, dense, progress=False)
    assert stack.lowrank.tied and not stack.deltas
    w = torch.tensor([0.5, 0.2, 0.3])
    with torch.no_grad():
        got = functional_call(
            lowrank_model, stack.mix_params(w), args=(), kwargs={"input_ids": TOKENS}
        ).logits
        want = functional_call(
            reference_model, reference.mix_params(w), args=(), kwargs={"input_ids": TOKENS}
        )
        # float32 rounding of two association orders, (x Aᵀ) Bᵀ against x (W + BA)ᵀ: 1.2e-5 at one
        # logit of 1944 with an AMD EPYC's AVX2 kernels, within 1e-5 with AVX-512's
        torch.testing.assert_close(got, want.logits, atol=5e-5, rtol=1e-4)
        assert not torch.allclose(got, base(input_ids=TOKENS).logits, atol=1e-3)  # the experts moved it


class _ShiftedEmbedding(torch.nn.Embedding):
    """An embedding that adds a constant to its rows: not a scaling of them, so an update of its
    weight cannot be added as low-rank rows of its output."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + 0.5


def test_an_embedding_that_is_not_scaled_rows_is_refused_low_rank(tmp_path):
    """The rows added to an embedding's output are scaled by what the module scales its weight's
    rows by (1, Gemma 3's √width); a module that does anything else is refused in one line, which
    names it and the merge methods that make its update dense."""
    from mergeopt.merging.lowrank import _row_scale

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    _, adapters, _, _ = make_world(tmp_path, EMBEDDINGS, base)
    plain = base.get_input_embeddings()
    assert _row_scale("model.embed_tokens", plain) == 1.0
    shifted = _ShiftedEmbedding(plain.num_embeddings, plain.embedding_dim)
    shifted.load_state_dict(plain.state_dict())
    model = copy.deepcopy(base)
    model.set_input_embeddings(shifted)
    with pytest.raises(
        UserError,
        match=r"^model.embed_tokens \(_ShiftedEmbedding\) returns more than scaled rows of its weight, so a "
        "LoRA expert's update of it cannot be added low-rank: use merge.method ties or dare",
    ):
        build_expert_stack(model, list(NAMES), {}, adapters, progress=False)


def _per_layer_step_matches(world, dense_names):
    """The stack of the world's experts (``dense_names`` dense, the rest LoRA) after checking its
    step against the whole-model merge of PEFT's merged experts."""
    from mergeopt.memory import checkpointing
    from tests.test_layer_merge import loss_and_grad, padded_batch, per_layer_loss, reference_loss

    base, adapters, dense, _ = world
    plain = copy.deepcopy(base)
    reference = build_stack(copy.deepcopy(base), dense, progress=False)
    model = copy.deepcopy(base)
    stack = build_expert_stack(
        model,
        list(NAMES),
        {n: dense[n] for n in dense_names},
        {n: a for n, a in adapters.items() if n not in dense_names},
        progress=False,
    )
    batch = padded_batch()
    batch.input_ids.remainder_(base.config.vocab_size - 3).add_(3)  # that world's ids, this vocabulary
    logits = torch.tensor([0.3, -0.4, 0.2], dtype=torch.float64)
    want_loss, want_grad = loss_and_grad(lambda w: reference_loss(plain, reference, w, batch), logits)
    assert want_grad.abs().min() > 1e-6
    for chunk, checkpointed in [(None, False), (5, True)]:
        (checkpointing.enable if checkpointed else checkpointing.disable)(model)
        got_loss, got_grad = loss_and_grad(
            lambda w, c=chunk: per_layer_loss(model, stack, w, batch, c), logits
        )
        # PEFT merged the dense references in float32: their rounding bounds the agreement
        assert got_loss == pytest.approx(want_loss, rel=1e-6), (chunk, checkpointed)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-7, rtol=1e-4, msg=f"{chunk} {checkpointed}")
    checkpointing.disable(model)
    return stack
