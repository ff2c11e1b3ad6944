"""Every registered merge method, as one matrix, against the truth: peft.utils.merge_utils' output,
one-hot identities, central finite differences of the gradient, the stack's fast anchor-form path
against the pure reference function, seeded DARE masks and M³ draws, and the registry's names."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from peft.utils import merge_utils
from torch.func import functional_call
from transformers import LlamaForCausalLM

from mergeopt.config import MergeSection
from mergeopt.errors import UserError
from mergeopt.merging.methods import METHODS, get_method, mixup
from mergeopt.merging.methods.dare import parameter_generator
from mergeopt.merging.stacking import build_stack
from tests.conftest import perturbed, tiny_config

SHAPES = [(11,), (6, 5), (3, 4, 5)]
DENSITY = 0.6
K = 3


def peft_delta(name, task_vectors, weights, density, majority_sign):
    """peft's merged delta Σ_i w_i τ'_i for the method of that name."""
    tvs = list(task_vectors)
    if name == "linear":
        return merge_utils.task_arithmetic(tvs, weights)
    if name == "ties":
        return merge_utils.ties(tvs, weights, density, majority_sign)
    if name == "dare_linear":
        return merge_utils.dare_linear(tvs, weights, density)
    return merge_utils.dare_ties(tvs, weights, density, majority_sign)


def options(name, seed=0, density=DENSITY, majority_sign="total"):
    """The method's keyword options, with a fresh generator at ``seed`` for random methods."""
    method = get_method(name)
    opts = method.options(MergeSection(method=name, density=density, majority_sign=majority_sign))
    if method.random:
        opts["generator"] = torch.Generator().manual_seed(seed)
    return opts


def problem(shape, dtype, seed=0, k=K):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=dtype)
    tau = 0.1 * torch.randn((k, *shape), generator=gen, dtype=dtype)
    w = torch.softmax(torch.randn(k, generator=gen, dtype=dtype), 0)
    return base, tau, w


CASES = [
    (name, sign)
    for name, method in METHODS.items()
    for sign in (("total", "frequency") if "majority_sign" in method.params else ("total",))
]


def test_registry_names_are_exactly_the_recipe_methods():
    assert set(METHODS) == set(get_args(MergeSection.model_fields["method"].annotation))
    assert all(METHODS[n].name == n for n in METHODS)


def test_unknown_method_is_a_user_error_naming_it():
    with pytest.raises(UserError, match=r"unknown merge method 'slerpy'; known: dare_linear, dare_ties"):
        get_method("slerpy")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("name, sign", CASES)
def test_reference_and_prepared_form_agree_with_peft(name, sign, dtype, atol):
    """θ0 + scale · peft_delta, for the reference and for θ0 + scale Σ w_i prepare(τ)_i alike.

    peft's dare_* draw from the global generator; ours from a Generator with the same seed.
    """
    scale, seed = 0.8, 7
    method = METHODS[name]
    for i, shape in enumerate(SHAPES):
        base, tau, w = problem(shape, dtype, seed=i)
        torch.manual_seed(seed)
        want = base + scale * peft_delta(name, tau, w, DENSITY, sign)
        got = method.reference(base, tau, w, scale=scale, **options(name, seed, majority_sign=sign))
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
        prepared = method.prepare(tau, **options(name, seed, majority_sign=sign))
        via_prepared = base + scale * torch.einsum("k,k...->...", w, prepared)
        torch.testing.assert_close(via_prepared, want, atol=atol, rtol=0)


@pytest.mark.parametrize("name, sign", CASES)
def test_one_hot_weights_give_the_vertex(name, sign):
    """At w = e_j: the reference is θ0 + scale τ'_j, and equals peft with one-hot weights."""
    method = METHODS[name]
    base, tau, _ = problem((6, 5), torch.float64)
    prepared = method.prepare(tau, **options(name, 3, majority_sign=sign))
    for j, e in enumerate(torch.eye(K, dtype=torch.float64)):
        got = method.reference(base, tau, e, scale=1.5, **options(name, 3, majority_sign=sign))
        torch.testing.assert_close(got, base + 1.5 * prepared[j], atol=1e-14, rtol=0)
        torch.manual_seed(3)
        torch.testing.assert_close(
            got, base + 1.5 * peft_delta(name, tau, e, DENSITY, sign), atol=1e-14, rtol=0
        )
        assert torch.equal(mixup.coefficients(e, mixup.draw(0.4, K, 0)), e)  # mixup keeps vertices


def test_linear_one_hot_reproduces_the_expert():
    base, tau, _ = problem((6, 5), torch.float64)
    experts = base + tau
    for j, e in enumerate(torch.eye(K, dtype=torch.float64)):
        torch.testing.assert_close(
            METHODS["linear"].reference(base, experts - base, e), experts[j], atol=1e-15, rtol=0
        )


def test_dare_linear_at_density_one_is_linear():
    base, tau, w = problem((6, 5), torch.float64)
    want = METHODS["linear"].reference(base, tau, w, scale=0.9)
    got = METHODS["dare_linear"].reference(base, tau, w, scale=0.9, **options("dare_linear", density=1.0))
    assert torch.equal(got, want)


@pytest.mark.parametrize("alpha", [None, 0.5])
@pytest.mark.parametrize("name", list(METHODS))
def test_gradient_reaches_every_weight_and_matches_finite_differences(name, alpha):
    method = METHODS[name]
    base, tau, w = problem((6, 5), torch.float64)
    probe = torch.randn(6, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    lam = None if alpha is None else mixup.draw(alpha, K, 1)

    def loss(weights):
        coeffs = weights if lam is None else mixup.coefficients(weights, lam)
        merged = method.reference(base, tau, coeffs, scale=1.3, **options(name, 5))
        return (torch.sin(4 * merged) * probe).sum()

    weights = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(weights), weights)
    eps = 1e-6
    numeric = torch.stack(
        [(loss(w + eps * e) - loss(w - eps * e)) / (2 * eps) for e in torch.eye(K, dtype=w.dtype)]
    )
    assert grad.abs().min() > 1e-3, f"a weight gets no gradient: {grad}"
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


# --- the stack's fast path against the reference -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    """A float64 tiny Llama θ0 and three perturbed experts in which one tensor is untouched by every
    expert and one is changed identically by all (the unchanged / shared bookkeeping)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).double().eval()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    experts = {}
    for i, name in enumerate(("a", "b", "c")):
        sd = perturbed(base, 300 + i).double().state_dict()
        sd["model.norm.weight"] = theta0["model.norm.weight"].clone()
        sd["lm_head.weight"] = theta0["lm_head.weight"] * 1.5
        experts[name] = sd
    return theta0, experts


def fresh_model(theta0):
    model = LlamaForCausalLM(tiny_config()).double().eval()
    model.load_state_dict(theta0)
    return model


def reference_params(theta0, experts, merge, seed, w):
    """Every parameter by the pure reference function, DARE generators seeded as the stack seeds them."""
    method = get_method(merge.method)
    coeffs = w if merge.mixup_alpha is None else mixup.coefficients(w, mixup.draw(merge.mixup_alpha, K, seed))
    out = {}
    for name, base in theta0.items():
        tau = torch.stack([e[name] for e in experts.values()]) - base
        opts = method.options(merge)
        if method.random:
            opts["generator"] = parameter_generator(seed, name)
        out[name] = method.reference(base, tau, coeffs, scale=merge.scale, **opts)
    return out


class _ReadWeights(torch.nn.Module):
    """Reads each stacked parameter from its module, as the module's forward does."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self):
        return {
            n: getattr(self.model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
            for n in self.names
        }


def per_layer_values(model, stack, weights):
    """The per-layer merge's values at w, with w handed to the mixture buffers by functional_call."""
    params = {f"model.{k}": v for k, v in stack.mix_params(weights).items()}
    return functional_call(_ReadWeights(model, stack.deltas), params, args=())


@pytest.mark.parametrize("scale, alpha", [(1.0, None), (0.7, 0.5)])
@pytest.mark.parametrize("name", list(METHODS))
def test_stack_fast_path_equals_the_reference(tiny_llama, name, scale, alpha):
    """Values and d(loss)/dw of anchor + Σ_{i≥2} w_i deltas_i equal θ0 + λ Σ_i c_i(w) τ'_i, parameter by
    parameter, unstacked ones (left in the model) included, at several w on the simplex."""
    theta0, experts = tiny_llama
    merge = MergeSection(method=name, scale=scale, density=DENSITY, mixup_alpha=alpha)
    model = fresh_model(theta0)
    stack = build_stack(model, experts, dtype=torch.float64, progress=False, merge=merge, seed=11)
    assert stack.unchanged == ["model.norm.weight"]
    # identical experts stay identical after a deterministic prepare, but DARE draws each its own mask
    assert ("lm_head.weight" in stack.shared) == (not get_method(name).random)
    model_params = {n: p.detach() for n, p in model.named_parameters() if ".parametrizations." not in n}
    gen = torch.Generator().manual_seed(2)
    for logits in [torch.randn(K, generator=gen, dtype=torch.float64) for _ in range(3)]:
        # the anchor form sees w only through w_2..w_K (w_1 = 1 − Σ): compare gradients in the logits
        z, zl, zr = (logits.clone().requires_grad_(True) for _ in range(3))
        merged = stack.merged(torch.softmax(z, 0))
        per_layer = per_layer_values(model, stack, torch.softmax(zl, 0))  # what each module reads
        got = {**model_params, **merged}
        want = reference_params(theta0, experts, merge, 11, torch.softmax(zr, 0))
        assert got.keys() == want.keys() and per_layer.keys() == merged.keys()
        for pname in want:
            torch.testing.assert_close(got[pname], want[pname], atol=1e-13, rtol=0, msg=pname)
        for pname in merged:
            torch.testing.assert_close(per_layer[pname], want[pname], atol=1e-13, rtol=0, msg=pname)
        probes = {
            n: torch.cos(torch.arange(t.numel(), dtype=torch.float64)).reshape(t.shape)
            for n, t in merged.items()
        }
        (grad,) = torch.autograd.grad(sum((merged[n] * p).sum() for n, p in probes.items()), z)
        (grad_layer,) = torch.autograd.grad(sum((per_layer[n] * p).sum() for n, p in probes.items()), zl)
        (grad_ref,) = torch.autograd.grad(sum((want[n] * p).sum() for n, p in probes.items()), zr)
        assert grad.abs().min() > 1e-3
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_layer, grad_ref, rtol=1e-10, atol=1e-12)


def test_stack_records_the_method_for_mixture_json(tiny_llama):
    theta0, experts = tiny_llama
    merge = MergeSection(
        method="dare_ties", scale=2.0, density=0.3, majority_sign="frequency", mixup_alpha=0.5
    )
    stack = build_stack(fresh_model(theta0), experts, progress=False, merge=merge, seed=4)
    assert stack.method == {
        "name": "dare_ties",
        "scale": 2.0,
        "density": 0.3,
        "majority_sign": "frequency",
        "mixup_alpha": 0.5,
        "mixup_lambda": np.random.default_rng(4).dirichlet([0.5] * 3).tolist(),
        "seed": 4,
    }
    plain = build_stack(fresh_model(theta0), experts, progress=False)
    assert plain.method == {"name": "linear", "scale": 1.0} and plain.mixup is None


# --- seeds ---------------------------------------------------------------------------------------------


def test_dare_masks_are_seeded_per_run_and_parameter():
    _, tau, _ = problem((40, 30), torch.float32)
    prepare = METHODS["dare_linear"].prepare

    def kept(seed, name):
        return prepare(tau, DENSITY, parameter_generator(seed, name)) != 0

    assert torch.equal(kept(0, "x.weight"), kept(0, "x.weight"))
    assert not torch.equal(kept(0, "x.weight"), kept(1, "x.weight"))
    assert not torch.equal(kept(0, "x.weight"), kept(0, "y.weight"))
    share = kept(0, "x.weight").double().mean().item()
    assert abs(share - DENSITY) < 0.03  # 3600 draws per expert: a binomial sd of 0.005


def test_stacks_built_with_the_same_seed_are_identical(tiny_llama):
    theta0, experts = tiny_llama
    merge = MergeSection(method="dare_ties", mixup_alpha=0.3)

    def build(seed):
        return build_stack(fresh_model(theta0), experts, progress=False, merge=merge, seed=seed)

    first, again, other = build(5), build(5), build(6)
    assert torch.equal(first.mixup, again.mixup) and not torch.equal(first.mixup, other.mixup)
    assert all(torch.equal(first.deltas[n], again.deltas[n]) for n in first.deltas)
    assert not any(torch.equal(first.deltas[n], other.deltas[n]) for n in first.deltas)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_at_two_experts_and_half_weights_is_m3(seed):
    """M³ merges with (λ, 1 − λ), λ ~ Beta(α, α): that is c((½, ½))."""
    lam = np.random.default_rng(seed).beta(0.4, 0.4)
    c = mixup.coefficients(torch.tensor([0.5, 0.5], dtype=torch.float64), mixup.draw(0.4, 2, seed))
    torch.testing.assert_close(c, torch.tensor([lam, 1 - lam], dtype=torch.float64), atol=1e-15, rtol=0)
    assert not np.array_equal(mixup.draw(0.4, 3, seed), mixup.draw(0.4, 3, seed + 1))
    np.testing.assert_array_equal(mixup.draw(0.4, 3, seed), np.random.default_rng(seed).dirichlet([0.4] * 3))


def test_mixup_tiny_alpha_keeps_one_hot_weights_defined():
    """α → 0 draws λ with exact zeros in float64; the floor keeps c(e_j) = e_j instead of 0/0."""
    lam = mixup.draw(1e-4, 4, seed=0)
    assert (lam > 0).all() and lam.sum() == pytest.approx(1.0)
    for j in range(4):
        one_hot = torch.eye(4, dtype=torch.float64)[j]
        torch.testing.assert_close(mixup.coefficients(one_hot, lam), one_hot)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_chunked_upcast_of_narrow_stacks_equals_the_one_shot_merge(storage, monkeypatch):
    """A bf16/fp16 stack is upcast in column chunks; the merge and its gradient are unchanged."""
    from mergeopt.merging.methods import linear

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(37, 29, generator=gen)
    deltas = (0.1 * torch.randn(3, 37, 29, generator=gen)).to(storage)
    w = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    expected = base + torch.einsum("k,kij->ij", w.detach(), deltas.float())
    upstream = torch.randn(37, 29, generator=gen)
    results = []
    for chunk in (1 << 24, 100, 7):  # one chunk, several, many with a ragged end
        monkeypatch.setattr(linear, "CHUNK", chunk)
        merged = linear.merge_linear(base, deltas, w)
        (grad,) = torch.autograd.grad((merged * upstream).sum(), w)
        results.append((merged.detach(), grad))
    for merged, grad in results:
        torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            grad, torch.einsum("kij,ij->k", deltas.float(), upstream), atol=1e-4, rtol=1e-5
        )


def test_dare_masks_come_from_a_cpu_generator_seeded_by_name():
    """The masks depend on (seed, parameter name) alone, not on the device (a CUDA generator would
    draw other numbers for the same seed): the generator is the CPU's."""
    from mergeopt.merging.methods.dare import drop

    assert parameter_generator(7, "w").device.type == "cpu"
    tau = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(0))
    first, again = (drop(tau, 0.3, parameter_generator(7, "w")) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, drop(tau, 0.3, parameter_generator(7, "v")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dare_rescaling_by_a_tensor_is_the_cpu_quotient(dtype):
    """The GPU's way to divide by the density (by a float tensor, in float32 for half and bfloat16:
    CUDA multiplies by the reciprocal of a Python number) gives the CPU's quotient bit for bit;
    here both run on the CPU, where the reciprocal differs from the quotient in many entries."""
    from mergeopt.merging.methods.dare import divide

    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    differs = []
    for density in (0.3, 0.7):
        by_number, by_tensor = torch.empty_like(tau), torch.empty_like(tau)
        divide(tau, density, by_number, by_tensor=False)
        divide(tau, density, by_tensor, by_tensor=True)
        assert torch.equal(by_tensor, by_number)
        assert torch.equal(by_number, tau / density)
        reciprocal = (tau.to(opmath) * (1 / torch.tensor(density, dtype=opmath))).to(dtype)
        differs.append(not torch.equal(reciprocal, by_number))  # CUDA's division by a number
    assert any(differs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_masks_on_cuda_equal_the_cpu_masks(dtype):
    """A fit on a GPU scores the masks (and rescaled entries) mergeopt.export.merge on a CPU writes."""
    from mergeopt.merging.methods.dare import drop

    tau = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    on_cpu = drop(tau, 0.3, parameter_generator(7, "w"))
    on_gpu = drop(tau.cuda(), 0.3, parameter_generator(7, "w"))
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_a_fused_expert_weight_is_trimmed_one_expert_matrix_at_a_time():
    """A mixture of experts' fused (experts, out, in) weight under TIES: each expert's matrix is
    trimmed and its signs elected on its own, as PEFT (and mergekit) merge the per-expert tensors
    its checkpoints store: one-hot and mixed weights against peft's ties on each slice, and not
    the fused tensor trimmed as one across its experts."""
    from tests.test_layer_merge import perturbed_experts, tiny_model

    model = tiny_model("mixtral")
    experts = perturbed_experts(model)
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    theta0 = model.get_parameter(fused).detach().clone()
    experts[next(iter(experts))][fused][1] *= 10.0  # one expert matrix of the first expert moved far more
    stack = build_stack(
        model, experts, progress=False, merge=MergeSection(method="ties", density=0.3), seed=0
    )
    tau = torch.stack([experts[e][fused] - theta0 for e in stack.expert_names])
    for w in (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.2, 0.5, 0.3])):
        per_matrix = [merge_utils.ties(list(tau[:, e]), w, 0.3, "total") for e in range(tau.shape[1])]
        torch.testing.assert_close(
            stack.merged(w)[fused], theta0 + torch.stack(per_matrix), atol=1e-6, rtol=0
        )
        across = theta0 + merge_utils.ties(list(tau), w, 0.3, "total")
        assert not torch.allclose(stack.merged(w)[fused], across, atol=1e-6)
