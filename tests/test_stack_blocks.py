"""Large matrices stacked a block of rows at a time (mergeopt.merging.stacking.in_blocks): the same
stack as stacking each tensor whole, for float32, bfloat16 and int8 stacks, for experts read from
checkpoints (rows only) or held in memory, for a mixture of experts' fused weights (blocks of
experts, read from those experts' tensors alone), for a parameter every expert shares, and with
the float32 temporaries of one block, measured."""

from __future__ import annotations

import pytest
import torch

from mergeopt.loading.checkpoints import open_checkpoint, under_model_names
from mergeopt.merging import stacking
from mergeopt.merging.stacking import build_stack
from tests.conftest import save_checkpoint
from tests.test_layer_merge import perturbed_experts, tiny_model


def _stacks(model_of, experts, dtype, monkeypatch, block):
    """The stack built whole, then with blocks of ``block`` elements (which must be used)."""
    whole = build_stack(model_of(), experts, dtype=dtype, progress=False)
    blocked_names = []
    original = stacking._stack_in_blocks
    monkeypatch.setattr(stacking, "STACK_BLOCK", block)
    monkeypatch.setattr(
        stacking, "_stack_in_blocks", lambda *a, **k: blocked_names.append(a[1]) or original(*a, **k)
    )
    blocked = build_stack(model_of(), experts, dtype=dtype, progress=False)
    monkeypatch.undo()
    assert len(blocked_names) >= 10, blocked_names  # every matrix of the tiny models
    return whole, blocked


def _assert_same(whole, blocked):
    assert whole.anchor.keys() == blocked.anchor.keys() and whole.scales.keys() == blocked.scales.keys()
    assert (whole.shared, whole.unchanged) == (blocked.shared, blocked.unchanged)
    for name in whole.anchor:
        assert whole.anchor[name].dtype == blocked.anchor[name].dtype, name
        assert torch.equal(whole.anchor[name], blocked.anchor[name]), name
        assert torch.equal(whole.deltas[name], blocked.deltas[name]), name
    for name in whole.scales:
        assert torch.equal(whole.scales[name], blocked.scales[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_blocked_stacking_equals_whole_stacking(arch, dtype, tmp_path, monkeypatch):
    """Every matrix of over 100 elements in blocks of about 100 (several rows, or one expert's
    matrix of a fused weight at a time), from checkpoints and from memory."""
    model = tiny_model(arch)
    experts = perturbed_experts(model)
    shared = "model.layers.1.self_attn.o_proj.weight"  # every expert the same value, not θ0
    for state in experts.values():
        state[shared] = experts["e0"][shared].clone()
    save_checkpoint(model, tmp_path / "base")
    on_disk = {}
    for name, state in experts.items():
        copy = tiny_model(arch)
        copy.load_state_dict(state, strict=False)
        save_checkpoint(copy, tmp_path / name)
        on_disk[name] = under_model_names(open_checkpoint(tmp_path / name), copy)
    for source in (experts, on_disk):
        whole, blocked = _stacks(lambda: tiny_model(arch), source, dtype, monkeypatch, 100)
        assert shared in whole.shared
        _assert_same(whole, blocked)


@pytest.mark.parametrize("block", [4096, 20000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_blocked_stacking_plan_bounds_the_live_bytes(dtype, block, monkeypatch):
    """The plan's stacking row for a matrix stacked in blocks (phases.stacking_bytes with
    ``block``) against the live peak of building the stack of a small Llama whose largest matrix
    (its embeddings, 256,000 elements) is stacked in blocks: 1% below to 15% above, as the whole
    tensor's estimate (measured 0.998x to 1.078x; a float32 parameter under a bfloat16 stack holds
    its whole anchor in float32 through the blocks, which the estimate adds to the block's
    temporaries). The blocks cut the temporaries to a few percent of the whole tensor's."""
    from mergeopt.memory import phases
    from tests.test_plan import assert_bound, recipe, small_problem

    monkeypatch.setattr(stacking, "STACK_BLOCK", block)
    _, stack, _, peak = small_problem(4000, 64, 176, dtype)
    largest = max(t.numel() for t in stack.anchor.values())
    per_row = 64
    r = recipe("b", {"x": "x", "y": "y", "z": "z", "w": "w"}, stack_dtype=dtype)
    planned = phases.stacking_bytes(r, 4, largest, 0, block=(block // per_row) * per_row)
    assert_bound(stack.nbytes() + planned, peak, 0.01, 0.15)
    whole = phases.stacking_bytes(r, 4, largest, 0)
    assert planned < whole / 2


def test_the_plan_stacks_large_checkpoint_matrices_in_blocks(tmp_path):
    """`mergeopt plan` of four Mixtral-8x7B experts from checkpoint directories (config.json alone
    here) plans the fused weights' stacking in blocks: 3.2 GiB of temporaries in bfloat16 instead of
    14.9 GiB whole, which a random:// world, whose experts are made whole, still plans."""
    from mergeopt.config import load_recipe
    from mergeopt.memory import dry_run, plan
    from tests.conftest import REPO
    from tests.test_plan import GPU_80GB

    (tmp_path / "config.json").write_text(
        (REPO / "tests" / "data" / "configs" / "mixtral-8x7b.json").read_text()
    )
    rows = {}
    for source in (str(tmp_path), f"random://{tmp_path}"):
        experts = [f"model.experts.{e}={source}" for e in ("math", "code", "chat", "multilingual")]
        r = load_recipe(REPO / "recipes" / "8b.yaml", [f"model.base={source}", *experts])
        inventory, dims = dry_run.read_inventory(r)
        p = plan.plan_memory(r, inventory, dims, GPU_80GB)
        (row,) = [x for x in p.phases if x.label.startswith("stacking")]
        rows[source.startswith("random")] = (row.label, row.bytes / 2**30)
    assert rows[False][0].endswith("in blocks of rows") and round(rows[False][1], 1) == 3.2
    assert not rows[True][0].endswith("in blocks of rows") and round(rows[True][1], 1) == 14.9
