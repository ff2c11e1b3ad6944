"""The task-vector stack against the truth: one-hot w gives the expert, uniform w gives the average,
excluded parameters stay at θ0, and the linear merge equals peft's task_arithmetic.

The model's forward at w goes through the per-layer merge (the mixture buffers handed to
functional_call); ``stack.merged`` is the whole-model reference it is compared with elsewhere."""

from __future__ import annotations

import pytest
import torch
from peft.utils.merge_utils import task_arithmetic
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from mergeopt.errors import UserError
from mergeopt.loading.checkpoints import open_all
from mergeopt.merging.methods.linear import merge_linear
from mergeopt.merging.stacking import build_stack


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(random_world):
    base = load(random_world["base"])
    _, experts = open_all(random_world["base"], random_world["experts"])
    stack = build_stack(base, experts, progress=False)
    return base, stack


def batch_ids():
    return torch.randint(4, 40, (3, 12), generator=torch.Generator().manual_seed(0))


def test_one_hot_reproduces_each_expert_logits(random_world, loaded):
    base, stack = loaded
    ids = batch_ids()
    for i, name in enumerate(stack.expert_names):
        expert = load(random_world["experts"][name])
        with torch.no_grad():
            want = expert(input_ids=ids).logits
            got = functional_call(
                base, stack.mix_params(torch.eye(len(stack.expert_names))[i]), (ids,)
            ).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_uniform_weights_equal_the_plain_average_of_expert_weights(random_world, loaded):
    base, stack = loaded
    k = len(stack.expert_names)
    merged = stack.merged(torch.full((k,), 1.0 / k))
    experts = [load(random_world["experts"][n]).state_dict() for n in stack.expert_names]
    for name, tensor in merged.items():
        average = sum(e[name] for e in experts) / k
        torch.testing.assert_close(tensor, average, atol=1e-6, rtol=0)


def test_anchor_form_equals_theta0_plus_weighted_task_vectors(random_world, loaded):
    """θ_1 + Σ_{i≥2} w_i (θ_i − θ_1) is θ0 + Σ_i w_i τ_i on the simplex; peft's task_arithmetic is the reference."""
    _, stack = loaded
    theta0 = load(random_world["base"]).state_dict()
    experts = [load(random_world["experts"][n]).state_dict() for n in stack.expert_names]
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        w = torch.softmax(torch.randn(3, generator=gen), 0)
        merged = stack.merged(w)
        for name, tensor in merged.items():
            want = theta0[name] + task_arithmetic([e[name] - theta0[name] for e in experts], w)
            torch.testing.assert_close(tensor, want, atol=1e-6, rtol=0)


def test_excluded_parameters_stay_at_theta0(random_world):
    base = load(random_world["base"])
    theta0 = load(random_world["base"]).state_dict()
    _, experts = open_all(random_world["base"], random_world["experts"])
    stack = build_stack(base, experts, exclude=[r"embed_tokens", r"norm", r"^lm_head"], progress=False)
    assert stack.excluded and not any(("norm" in n or "embed" in n or "lm_head" in n) for n in stack.deltas)
    # excluded tensors are still the model's own parameters, holding θ0
    for name in stack.excluded:
        assert torch.equal(base.get_parameter(name), theta0[name])
    assert len(stack.excluded) + len(stack.deltas) + len(stack.unchanged) + len(stack.shared) == len(theta0)


def test_parameters_equal_in_all_experts_are_not_stacked(random_world, tmp_path):
    from tests.conftest import save_checkpoint

    base = load(random_world["base"])
    experts = {}
    for name in ("a", "b"):
        expert = load(random_world["experts"]["alpha" if name == "a" else "beta"])
        with torch.no_grad():
            expert.model.norm.weight.copy_(base.model.norm.weight)  # untouched by both experts
            expert.lm_head.weight.copy_(base.lm_head.weight * 1.5)  # changed, identically in both
        experts[name] = str(save_checkpoint(expert, tmp_path / name))
    _, opened = open_all(random_world["base"], experts)
    stack = build_stack(base, opened, progress=False)
    assert stack.unchanged == ["model.norm.weight"] and stack.shared == ["lm_head.weight"]
    assert "model.norm.weight" not in stack.deltas and "lm_head.weight" not in stack.deltas
    # the model now holds the common value, so every mixture still reproduces each expert
    ids = batch_ids()
    for i, name in enumerate(("a", "b")):
        with torch.no_grad():
            got = functional_call(base, stack.mix_params(torch.eye(2)[i]), (ids,)).logits
            want = load(experts[name])(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_stack_keeps_only_z_differentiable(loaded):
    base, stack = loaded
    assert not any(p.requires_grad for p in base.parameters())
    assert not any(t.requires_grad for t in stack.deltas.values())


def test_linear_merge_matches_peft_task_arithmetic():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(7, 5, generator=gen)
    deltas = torch.randn(4, 7, 5, generator=gen)
    w = torch.softmax(torch.randn(4, generator=gen), 0)
    want = base + task_arithmetic(list(deltas), w)
    torch.testing.assert_close(merge_linear(base, deltas, w), want, atol=1e-6, rtol=0)


def test_bfloat16_stack_is_merged_in_float32():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(64, generator=gen)
    deltas = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    w = torch.tensor([0.2, 0.3, 0.5])
    want = base + (w[:, None] * deltas.float()).sum(0)
    got = merge_linear(base, deltas, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_wrong_number_of_weights(loaded):
    _, stack = loaded
    with pytest.raises(ValueError, match="expected 3 weights"):
        stack.merged(torch.ones(2) / 2)


def test_in_memory_state_dicts_give_the_same_stack(random_world, loaded):
    base, stack = loaded
    dicts = {n: load(p).state_dict() for n, p in random_world["experts"].items()}
    again = build_stack(load(random_world["base"]), dicts, progress=False)
    assert again.deltas.keys() == stack.deltas.keys()
    for name in stack.deltas:
        assert torch.equal(again.deltas[name], stack.deltas[name])


def test_nan_in_an_expert_is_refused(random_world):
    base = load(random_world["base"])
    bad = load(random_world["experts"]["alpha"]).state_dict()
    bad["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    good = load(random_world["experts"]["beta"]).state_dict()
    with pytest.raises(
        UserError, match=r"model\.layers\.0\.mlp\.up_proj\.weight of expert 'alpha' contains NaN"
    ):
        build_stack(base, {"alpha": bad, "beta": good}, progress=False)


def test_stacked_parameters_read_the_merge_and_theta0_is_dropped(random_world):
    """The model's stacked tensors are parametrizations over the anchor: θ0 of them is not held."""
    from torch.nn.utils import parametrize

    base = load(random_world["base"])
    _, experts = open_all(random_world["base"], random_world["experts"])
    stack = build_stack(base, experts, progress=False)
    held = {p.data_ptr() for p in base.parameters()}
    for name, anchor in stack.anchor.items():
        module_name, _, attr = name.rpartition(".")
        assert parametrize.is_parametrized(base.get_submodule(module_name), attr)
        assert anchor.data_ptr() in held  # the parameter the module keeps is the anchor itself
    w = torch.tensor([0.2, 0.5, 0.3])
    stack.write_mixture(w)
    with torch.no_grad():
        for name, want in stack.merged(w).items():
            module_name, _, attr = name.rpartition(".")
            torch.testing.assert_close(
                getattr(base.get_submodule(module_name), attr), want, atol=1e-6, rtol=0
            )


def test_buffer_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="out must be a contiguous"):
        merge_linear(torch.zeros(3, 2), torch.zeros(2, 3, 2), torch.ones(2) / 2, out=torch.empty(2, 3))


def test_tied_embeddings_merge_once_and_reproduce_each_expert(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.conftest import perturbed, save_checkpoint, tiny_config

    torch.manual_seed(1)
    base = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    save_checkpoint(base, tmp_path / "base")
    paths = {n: str(save_checkpoint(perturbed(base, 200 + i), tmp_path / n)) for i, n in enumerate("xy")}
    model = load(tmp_path / "base")
    _, experts = open_all(tmp_path / "base", paths)
    stack = build_stack(model, experts, progress=False)
    assert "model.embed_tokens.weight" in stack.deltas and "lm_head.weight" not in stack.deltas
    ids = batch_ids()
    assert model.lm_head.parametrizations.weight[0] is model.model.embed_tokens.parametrizations.weight[0]
    for i, name in enumerate("xy"):
        with torch.no_grad():
            got = functional_call(model, stack.mix_params(torch.eye(2)[i]), (ids,)).logits
            want = load(paths[name])(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_model_at_w_exists_only_inside_at(loaded):
    """Inside ``stack.at(w)`` a plain forward is the merge at w; after it, NaN: no code can rely
    on whatever was merged last."""
    model, stack = loaded
    w, ids = torch.tensor([0.2, 0.5, 0.3]), batch_ids()
    with torch.no_grad():
        reference = functional_call(model, stack.mix_params(w), (ids,)).logits
        with stack.at(w) as merged:
            inside = merged(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(inside, reference, atol=1e-5, rtol=0)
    assert torch.isnan(after).all()
    stack.write_mixture(w)  # the explicit setter still works (mergeopt merge writes the model out)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)
