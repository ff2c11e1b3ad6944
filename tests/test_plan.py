"""The memory plan (--dry-run): byte rows against exact tensor sizes and real stacks; phase
estimates against the live tensor bytes of real steps; the CLI reads no weights and writes nothing.

Exact rows are checked against Llama-3.1-8B's shapes built independently on the meta device and
against ``build_stack(...).nbytes()`` on the tiny world. The phase estimates (stacking, training
micro-step, evaluation batch) are checked against the peak of live tensor bytes, counted op by op
with a dispatch mode, of the same code running on small Llamas: the estimate must lie between
1% below and 15% above the measurement. The per-rank plan of a sharded stack (model.shard fsdp)
is checked the same way on each rank of 3 and 2 gloo processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mergeopt import fit
from mergeopt.config import MergeSection, load_recipe, recipe_from_dict
from mergeopt.errors import UserError, run_cli
from mergeopt.loading import checkpoints
from mergeopt.loading.checkpoints import open_all
from mergeopt.memory import activations, checkpointing, dry_run, phases, plan, plan_table
from mergeopt.memory.ranks import check_shard_division
from mergeopt.memory.sizes import DeviceMemory, Dims, Inventory, MemoryPlan
from mergeopt.merging.stack import DTYPES
from mergeopt.merging.stacking import build_stack
from mergeopt.objectives.data import DevSet, Example, collate
from mergeopt.objectives.loss import dev_loss, evaluate_sums
from tests.conftest import REPO, fork_ranks, perturbed, run_in_process

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_theta=500000,
)
EXPERTS_8B = ("math", "code", "chat", "multilingual")
ROOMY = DeviceMemory("cpu", "test device", 2**50, 2**50)


def recipe(base: str, experts: dict[str, str], **model) -> object:
    tree = {
        "device": "cpu",
        "model": {"base": base, "experts": experts, **model},
        "data": {"dev": [{"name": "a", "path": "/not/read.jsonl"}], "max_length": 64},
    }
    return recipe_from_dict(tree)


# ----------------------------------------------------------------------------- exact rows


def meta_shapes(fields: dict) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a Llama with these config fields, built on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def config_8b(tmp_path_factory):
    """Llama-3.1-8B's config.json alone (no weights) and its parameters built on the meta device."""
    path = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(**LLAMA_8B).save_pretrained(path)
    return path, {name: math.prod(shape) for name, shape in meta_shapes(LLAMA_8B).items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("exclude", [(), ("embed_tokens", "lm_head", "norm")])
def test_8b_rows_equal_the_meta_model_tensor_sizes(config_8b, dtype, exclude):
    path, sizes = config_8b
    r = recipe(str(path), dict.fromkeys(EXPERTS_8B, str(path)), stack_dtype=dtype, exclude=list(exclude))
    inventory, dims = dry_run.read_inventory(r)
    p = plan.plan_memory(r, inventory, dims, ROOMY)
    stacked = {n: s for n, s in sizes.items() if not any(x in n for x in exclude)}
    s = sum(stacked.values())
    assert p.parameters == sum(sizes.values()) == 8_030_261_248
    assert p.tensors == len(sizes) == 291
    assert (p.stacked_parameters, p.stacked_tensors) == (s, len(stacked))
    assert s == (8_030_261_248 if not exclude else 6_979_321_856)
    size = 4 if dtype == "float32" else 2
    assert p.row("model parameters not stacked") == 4 * (8_030_261_248 - s)  # float32 compute on the CPU
    assert p.row("stack anchor") == size * s
    assert p.row("stack differences") == 3 * s * size
    assert p.row("optimizer") == 4 * 8 * 4
    assert dims == Dims(4096, 14336, 32, 32, 8, 128, 128256)
    assert "no safetensors for base" in inventory.notes[0]


def test_each_suggested_override_saves_what_the_verdict_says(config_8b):
    """The 8b recipe (float32 stack, nothing excluded) on an 80 GB card: every suggestion, typed as
    printed, re-plans to exactly the saving shown."""
    path, _ = config_8b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    overrides += [
        "model.stack_dtype=float32",
        "model.exclude=[]",
        "optim.activation_checkpointing=false",
        "model.compute_dtype=bfloat16",
    ]
    r = load_recipe(REPO / "recipes" / "8b.yaml", overrides)
    inventory, dims = dry_run.read_inventory(r)
    card = DeviceMemory("cuda:0", "an 80 GB card", 80 * 2**30, 79 * 2**30)
    short = plan.plan_memory(r, inventory, dims, card)
    roomy = plan.plan_memory(r, inventory, dims, ROOMY)
    assert roomy.fits and not roomy.suggestions and short.peak == roomy.peak and short.fits is False
    keys = {override.split("=")[0] for override, _ in short.suggestions}
    assert keys == {
        "model.stack_dtype",
        "model.exclude",
        "optim.batch_size",
        "data.max_length",
        "optim.activation_checkpointing",
    }
    for override, saved in short.suggestions:
        changed = load_recipe(REPO / "recipes" / "8b.yaml", [*overrides, *override.split(" ")])
        assert plan.plan_memory(changed, inventory, dims, card).peak == short.peak - saved > 0
    text = plan_table.verdict(short)
    assert text.startswith(f"does not fit: short by {plan_table.gib(short.peak - card.free)} GiB; try\n")
    knob, saved = next((k, v) for k, v in short.suggestions if k.startswith("model.stack_dtype="))
    assert re.search(rf"\n  {knob} +saves +{plan_table.gib(saved)} GiB\n", text), text
    *_, together, sharded = text.splitlines()  # the knobs together, then the GPUs that hold it sharded
    assert together.startswith(f"  all of them: peak {plan_table.gib(short.combined_peak)} GiB, ")
    assert short.sharded_fit is not None and sharded.startswith(
        f"  or, as written, model.shard=fsdp over {short.sharded_fit[0]} GPUs under torchrun: "
    )


def test_zero_order_strategies_plan_no_backward(config_8b):
    path, _ = config_8b
    r = recipe(str(path), dict.fromkeys(EXPERTS_8B, str(path)))
    r = r.model_copy(update={"search": r.search.model_copy(update={"strategy": "cmaes"})})
    inventory, dims = dry_run.read_inventory(r)
    p = plan.plan_memory(r, inventory, dims, ROOMY)
    assert [row.label.split(":")[0].split(",")[0] for row in p.phases] == ["stacking", "evaluation batch"]
    held = 4 * 8_030_261_248 + 3 * 4 * 8_030_261_248 + 4 * 8 * 4  # anchor and differences, float32
    assert p.peak == held + max(p.row("stacking"), p.row("evaluation batch"))


def test_tiny_world_stack_rows_equal_the_built_stack(tiny_world):
    base, experts = (
        str(tiny_world / "base"),
        {d: str(tiny_world / "experts" / d) for d in ("arith", "reverse", "brackets", "markov")},
    )
    _, opened = open_all(base, experts)
    for dtype, exclude in [("float32", []), ("bfloat16", ["norm", "embed"]), ("int8", [])]:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # stacking changes it
        r = recipe(base, experts, stack_dtype=dtype, exclude=exclude)
        inventory, dims = dry_run.read_inventory(r)
        p = plan.plan_memory(r, inventory, dims, ROOMY)
        stack = build_stack(model, opened, exclude, DTYPES[dtype], progress=False)
        assert not stack.unchanged and not stack.shared  # no parameter is equal in every expert
        assert p.row("stack anchor") + p.row("stack differences") == stack.nbytes()
        assert p.stacked_parameters == stack.num_stacked_parameters()
        assert p.excluded_tensors == len(stack.excluded)
        assert p.parameters == sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(base).parameters())
        assert "safetensors headers" in inventory.source


def test_parameters_equal_in_every_expert_make_the_plan_an_upper_bound(tiny_world, tmp_path):
    """One tensor reset to the base in every expert: the plan overcounts by exactly its bytes."""
    name = "model.layers.0.mlp.up_proj.weight"
    base = str(tiny_world / "base")
    kept = load_file(tiny_world / "base" / "model.safetensors")[name]
    experts = {}
    for d in ("arith", "reverse", "brackets", "markov"):
        copy = shutil.copytree(tiny_world / "experts" / d, tmp_path / d)
        tensors = load_file(copy / "model.safetensors")
        tensors[name] = kept.clone()
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        experts[d] = str(copy)
    r = recipe(base, experts, stack_dtype="bfloat16")
    inventory, dims = dry_run.read_inventory(r)
    p = plan.plan_memory(r, inventory, dims, ROOMY)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    stack = build_stack(model, open_all(base, experts)[1], (), torch.bfloat16, progress=False)
    assert stack.unchanged == [name]
    planned = p.row("stack anchor") + p.row("stack differences")
    assert planned - stack.nbytes() == kept.numel() * (2 + 3 * 2)


# ----------------------------------------------------------------------------- phase estimates


# Temporaries an ATen op allocates and frees inside itself, which an op-by-op count cannot see:
# torch.logsumexp forms exp(x − max) at its input's size before reducing it (the peak RSS of one
# call grows by exactly that tensor). The count adds them at the moment the op runs.
HIDDEN_TEMPORARIES = {torch.ops.aten.logsumexp.default: lambda x, *_: x.numel() * x.element_size()}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages made inside the mode and still alive (op by op, CPU), with
    the temporaries of :data:`HIDDEN_TEMPORARIES` at their op."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        hidden = HIDDEN_TEMPORARIES.get(func)
        if hidden is not None:
            self.peak = max(self.peak, self.now + hidden(*args))
        out = func(*args, **(kwargs or {}))
        self._count(out, args)
        return out

    def _count(self, out, args) -> None:
        for t in tree_flatten(out)[0]:
            storage = self._allocated(t, args) if isinstance(t, torch.Tensor) else None
            if storage is None:
                continue
            key = storage.data_ptr()
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _allocated(self, t: torch.Tensor, args) -> torch.UntypedStorage | None:
        """The storage an op's output ``t`` was made in, if it is new (None: already counted or known)."""
        del args
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or key in self.known or storage.nbytes() == 0:
            return None
        return storage


# funcol ops that are bookkeeping, not collectives (they return the tensors they are given)
FUNCOL_PLUMBING = {"wait_tensor", "_wrap_tensor_autograd"}


class RankBytes(LiveBytes):
    """:class:`LiveBytes` on one rank of a gloo process group, counting what the rank's code holds
    as a GPU backend (NCCL) would leave it.

    Each collective runs on private copies of its tensors and completes before it returns: an
    in-place one (``c10d``) writes its result into the caller's tensors, a functional one
    (``_c10d_functional``, DTensor's) hands back a fresh tensor. So the count holds what the
    caller allocates and keeps, and nothing gloo does: gloo's worker thread keeps a work's tensors
    alive until it lets go of the work (a free that comes at no fixed point), and it reduce-scatters
    through an all-reduce of a whole copy of the input. An output that shares a storage with an
    input allocates nothing (a view, an in-place op), nor do meta tensors (shapes) or tensor
    subclasses (DTensor, AsyncCollectiveTensor: wrappers of tensors counted where they are made).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        functional = (
            func.namespace == "_c10d_functional" and func.__name__.split(".")[0] not in FUNCOL_PLUMBING
        )
        if func.namespace != "c10d" and not functional:
            return super().__torch_dispatch__(func, types, args, kwargs)
        flat, spec = tree_flatten((args, kwargs))
        private = [t.clone() if type(t) is torch.Tensor else t for t in flat]  # made here: not counted
        private_args, private_kwargs = tree_unflatten(private, spec)
        out = func(*private_args, **private_kwargs)
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.ScriptObject):
                x.wait()
            elif functional and isinstance(x, torch.Tensor):
                torch.ops._c10d_functional.wait_tensor(x)
        if functional:  # the caller's own copy of the result; the backend keeps the one it made
            out = tree_map(lambda x: x.clone() if type(x) is torch.Tensor else x, out)
        else:  # in place: results go into the caller's tensors (its inputs come back as they were)
            for t, copy in zip(flat, private):
                if copy is not t:
                    t.copy_(copy)
            caller = {id(copy): t for t, copy in zip(flat, private) if copy is not t}
            out = tree_map(lambda x: caller.get(id(x), x), out)
        self._count(out, args)
        return out

    def _allocated(self, t: torch.Tensor, args) -> torch.UntypedStorage | None:
        if type(t) is not torch.Tensor or t.is_meta:
            return None
        key = t.untyped_storage().data_ptr()
        for a in tree_flatten(args)[0]:
            if type(a) is torch.Tensor and not a.is_meta and a.untyped_storage().data_ptr() == key:
                return None
        return super()._allocated(t, args)


def small_fields(vocab: int, hidden: int, intermediate: int) -> dict:
    """The config fields of the small Llamas the phases are measured on."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def small_problem(
    vocab: int,
    hidden: int,
    intermediate: int,
    dtype: str,
    method: str = "linear",
    compute: str = "float32",
    shard: tuple[int, int] | None = None,
    exclude: tuple[str, ...] = (),
):
    """A 2-layer Llama with 4 perturbed experts stacked (but ``exclude``), its dims and the live peak
    of stacking; ``shard`` (rank, world size): this rank's blocks of rows, in a gloo process group
    (:class:`RankBytes`)."""
    torch.manual_seed(0)
    config = LlamaConfig(**small_fields(vocab, hidden, intermediate), attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()  # sdpa: what from_pretrained picks, as in load_problem
    experts = {
        f"e{k}": {n: t.to(torch.bfloat16) for n, t in perturbed(model, 100 + k).state_dict().items()}
        for k in range(4)
    }
    model.to(DTYPES[compute])  # the fit loads the base in the compute dtype
    known = [*model.parameters(), *model.buffers(), *(t for e in experts.values() for t in e.values())]
    merge = MergeSection(method=method, scale=1.0 if method == "linear" else 2.0)
    with (LiveBytes if shard is None else RankBytes)(known) as build:
        stack = build_stack(model, experts, exclude, DTYPES[dtype], progress=False, merge=merge, shard=shard)
    dims = Dims.from_config(config.to_dict(), "test")
    return model, stack, dims, build.peak


def padded_items(batch: int, length: int, vocab: int, sets: int = 1) -> list[tuple[int, Example]]:
    """(set, example) pairs of lengths length, length − 3, …: a batch with padding."""
    gen = torch.Generator().manual_seed(0)
    items = []
    for b in range(batch):
        ids = torch.randint(0, vocab, (length - 3 * b,), generator=gen)
        scored = torch.ones_like(ids, dtype=torch.bool)
        scored[0] = False
        items.append((b % sets, Example(input_ids=ids, scored=scored)))
    return items


def padded_batch(batch: int, length: int, vocab: int, sets: int = 1):
    return collate(padded_items(batch, length, vocab, sets), pad_id=0)


def assert_bound(estimate: int, measured: int, below: float, above: float) -> None:
    """The estimate within ``below`` under to ``above`` over the measurement (a ratio)."""
    assert (1 - below) * measured <= estimate <= (1 + above) * measured, (
        estimate,
        measured,
        estimate / measured,
    )


def _stacked_tensors(stack):
    return [*stack.anchor.values(), *stack.deltas.values(), *stack.scales.values()]


def planned_and_live_step(
    model,
    base: str,
    experts: dict[str, str],
    compute: str,
    checkpointed: bool,
    batch: int,
    length: int,
    vocab: int,
):
    """(the plan's training step read from the checkpoints' and adapters' headers, the peak of live
    tensor bytes of dev_loss + backward on ``model`` stacked with ``experts`` as the fit stacks them,
    the stack) for a recipe of batch × length tokens, the loss 64 tokens at a time."""
    from mergeopt.loading.checkpoints import open_experts
    from mergeopt.memory import checkpointing, dry_run, plan
    from mergeopt.merging.mixed_experts import build_expert_stack
    from mergeopt.merging.stack import DTYPES
    from mergeopt.objectives.loss import dev_loss

    r = recipe(base, experts, compute_dtype=compute)
    r = r.model_copy(
        update={
            "data": r.data.model_copy(update={"max_length": length}),
            "optim": r.optim.model_copy(
                update={
                    "loss_chunk_tokens": 64,
                    "batch_size": batch,
                    "activation_checkpointing": checkpointed,
                }
            ),
        }
    )
    inventory, dims = dry_run.read_inventory(r)
    planned = plan.plan_memory(r, inventory, dims, ROOMY).row("training step")
    model.to(DTYPES[compute])  # the fit loads the base in the compute dtype
    _, dense, adapters = open_experts(base, experts)
    stack = build_expert_stack(
        model,
        list(experts),
        dense,
        adapters,
        progress=False,
        log=lambda _m: None,
        compute_dtype=DTYPES[compute],
    )
    if checkpointed:
        checkpointing.enable(model)
    z = torch.zeros(len(experts), dtype=torch.float64, requires_grad=True)
    held = []
    if stack.lowrank is not None:
        parts = [*stack.lowrank.modules.values(), *stack.lowrank.parameters.values()]
        for f in parts:
            held += [f.a, f.b, f.owner, f.scaling, getattr(f, "gain", None), getattr(f, "gain_owner", None)]
    known = [
        *model.parameters(),
        *model.buffers(),
        *_stacked_tensors(stack),
        *(t for t in held if t is not None),
        z,
    ]
    with LiveBytes(known) as step:
        dev_loss(model, stack, z, padded_batch(batch, length, vocab), torch.ones(1), 64).backward()
    return planned, step.peak, stack


def small_recipe(dtype: str, compute: str, length: int, **optim):
    r = recipe("b", {"x": "x", "y": "y", "z": "z", "w": "w"}, stack_dtype=dtype, compute_dtype=compute)
    return r.model_copy(
        update={
            "data": r.data.model_copy(update={"max_length": length}),
            "optim": r.optim.model_copy(update={"loss_chunk_tokens": 64, **optim}),
        }
    )


@pytest.mark.parametrize(
    "vocab,hidden,intermediate,batch,length,dtype,compute,checkpointed,over",
    [
        (2000, 64, 176, 4, 50, "float32", "float32", False, 0.15),  # the loss's chunks dominate
        (8000, 64, 176, 4, 50, "float32", "float32", False, 0.15),  # the merged output layer dominates
        (100, 256, 704, 4, 60, "float32", "float32", False, 0.15),  # layer activations dominate
        (100, 256, 704, 4, 60, "float32", "float32", True, 0.15),  # checkpointed layers
        (100, 256, 704, 4, 60, "bfloat16", "bfloat16", True, 0.15),
        (4000, 64, 176, 1, 8, "int8", "float32", False, 0.15),  # int8: one merge in flight dominates
    ],
)
def test_training_step_estimate_bounds_the_live_bytes(
    vocab, hidden, intermediate, batch, length, dtype, compute, checkpointed, over
):
    """Measured peak of live tensor bytes of dev_loss + backward (the per-layer path, chunked loss)."""
    model, stack, dims, _ = small_problem(vocab, hidden, intermediate, dtype, compute=compute)
    if checkpointed:
        checkpointing.enable(model)
    r = small_recipe(dtype, compute, length, activation_checkpointing=checkpointed)
    data = padded_batch(batch, length, vocab)
    z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    known = [*model.parameters(), *model.buffers(), *_stacked_tensors(stack), z]
    with LiveBytes(known) as step:
        dev_loss(model, stack, z, data, torch.ones(1), 64).backward()
    largest = max(t.numel() for t in stack.anchor.values())
    layer = sum(t.numel() for n, t in stack.anchor.items() if ".layers.0." in n)
    compute_bytes = DTYPES[compute].itemsize
    estimate = phases.training_bytes(r, dims, batch, largest, 4, compute_bytes, layer, True)
    assert_bound(estimate, step.peak, 0.05, over)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_saved_activations_equal_what_autograd_saves(compute):
    """Bytes autograd keeps for the backward (the per-layer merge's recipes are not tensors) against
    the activation formula, plus the whole-logits loss's log-softmax."""
    from mergeopt.merging import layer_merge

    model, stack, dims, _ = small_problem(300, 64, 176, compute, compute=compute)
    batch, length = 3, 40
    data = padded_batch(batch, length, 300)
    params = [*model.parameters(), *model.buffers(), *_stacked_tensors(stack)]
    skip = {t.untyped_storage().data_ptr() for t in params}
    saved: dict[int, int] = {}
    original = layer_merge._pack

    def pack(t):
        packed = original(t)
        if isinstance(packed, torch.Tensor) and t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return packed

    z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    layer_merge._pack = pack
    try:
        dev_loss(model, stack, z, data, torch.ones(1), None)
    finally:
        layer_merge._pack = original
    log_softmax = 4 * 300 * batch * (length - 1)
    c = DTYPES[compute].itemsize
    expected = activations.saved_activation_bytes(dims, batch, length, c) + log_softmax
    assert sum(saved.values()) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    "vocab,hidden,intermediate,dtype,compute,evaluate",
    [
        (2000, 64, 176, "float32", "float32", "float32"),  # a loss chunk dominates
        (100, 256, 704, "float32", "float32", "float32"),  # a layer's working set dominates
        (100, 256, 704, "int8", "bfloat16", "bfloat16"),
        (8000, 64, 176, "bfloat16", "bfloat16", "bfloat16"),
        # model.eval_dtype float32 (the default) over a bfloat16 model and stack
        (100, 256, 704, "int8", "bfloat16", "float32"),
        (8000, 64, 176, "bfloat16", "bfloat16", "float32"),
    ],
)
def test_evaluation_estimate_bounds_the_live_bytes(vocab, hidden, intermediate, dtype, compute, evaluate):
    model, stack, dims, _ = small_problem(vocab, hidden, intermediate, dtype, compute=compute)
    stack.eval_dtype = DTYPES[evaluate]
    batch, length = 4, 60
    r = small_recipe(dtype, compute, length, eval_batch_size=batch)
    data = padded_batch(batch, length, vocab)
    examples = [
        Example(input_ids=row[row != 0], scored=s[row != 0]) for row, s in zip(data.input_ids, data.scored)
    ]
    sets = [DevSet(name="a", weight=1.0, fit=examples, heldout=[])]
    known = [*model.parameters(), *model.buffers(), *_stacked_tensors(stack)]
    w = torch.full((4,), 0.25)
    with LiveBytes(known) as evaluation:
        evaluate_sums(model, stack, w, sets, "fit", batch, 0, torch.device("cpu"), 64)
    largest = max(t.numel() for t in stack.anchor.values())
    c, e = DTYPES[compute].itemsize, DTYPES[evaluate].itemsize
    estimate = phases.evaluation_bytes(r, dims, largest, 4, c, evaluate=e)
    assert_bound(estimate, evaluation.peak, 0.15, 0.15)


@pytest.mark.parametrize(
    "method,dtype",
    [
        ("linear", "float32"),
        ("linear", "bfloat16"),
        ("linear", "int8"),
        ("ties", "float32"),
        ("dare_linear", "bfloat16"),
    ],
)
def test_stacking_estimate_bounds_the_live_bytes(method, dtype):
    _, stack, _, peak = small_problem(4000, 64, 176, dtype, method)
    r = recipe("b", {"x": "x", "y": "y", "z": "z", "w": "w"}, stack_dtype=dtype)
    r = r.model_copy(update={"merge": MergeSection(method=method, scale=1.0 if method == "linear" else 2.0)})
    largest = max(t.numel() for t in stack.anchor.values())
    # in-memory experts: no read buffer (source_bytes 0); the plan adds the transient to the whole stack
    assert_bound(stack.nbytes() + phases.stacking_bytes(r, 4, largest, 0), peak, 0.01, 0.15)


# ----------------------------------------------------------------------------- the CLI


class NoTensorData:
    """Stands in for safetensors.safe_open: headers may be read, tensor data may not."""

    def __init__(self, *args, **kwargs):
        self._inner = _SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def keys(self):
        return self._inner.keys()

    def get_slice(self, name):
        return self._inner.get_slice(name)

    def get_tensor(self, name):
        raise AssertionError(f"a dry run read tensor data ({name})")


_SAFE_OPEN = checkpoints.safe_open


def test_dry_run_reads_no_weights_and_writes_nothing(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoints, "safe_open", NoTensorData)
    monkeypatch.setattr(fit, "fit", lambda *a, **k: pytest.fail("a dry run started the fit"))
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model")
    )
    before = sorted(p.relative_to(tiny_world.parent) for p in tiny_world.parent.rglob("*"))
    code = run_cli(
        fit.main,
        [
            str(REPO / "recipes" / "tiny.yaml"),
            f"world.cache_dir={tiny_world.parent}",
            "output_dir=out",
            "--dry-run",
        ],
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "parameters: 101,440 in 21 tensors (safetensors headers of" in out
    assert "stack differences, 3 x float32" in out and "verdict: fits" in out
    # a peak under 1 GiB is printed in MiB: 3 experts' differences of 101,440 float32 parameters
    assert re.search(r"\n {60,}MiB\n", out), out
    assert re.search(rf"\n  stack differences, 3 x float32 +{3 * 101_440 * 4 / 2**20:.2f}\n", out), out
    assert list(tmp_path.iterdir()) == []  # no output_dir, nothing else
    assert sorted(p.relative_to(tiny_world.parent) for p in tiny_world.parent.rglob("*")) == before


def test_8b_recipe_dry_run_from_config_json_alone(config_8b, tmp_path):
    path, _ = config_8b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    result = run_in_process(
        "fit", "recipes/8b.yaml", *overrides, f"output_dir={tmp_path / 'out'}", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "parameters: 8,030,261,248 in 291 tensors (config.json of" in result.stdout
    assert "stacked: 6,979,321,856 in 224 tensors x 4 experts" in result.stdout
    gib = plan_table.gib(3 * 6_979_321_856 * 2)
    assert re.search(rf"\n  stack differences, 3 x bfloat16 +{gib}\n", result.stdout), result.stdout
    assert "\nverdict: " in result.stdout
    assert not (tmp_path / "out").exists()


def test_8b_dry_run_warns_of_what_the_fit_would_refuse(config_8b, tmp_path):
    """recipes/8b.yaml's placeholder dev paths and an output_dir under a file: the plan is still
    printed (exit 0: planning before the data is in place is what --dry-run is for), and each input
    the fit would refuse is one warning line naming it; nothing is written."""
    path, _ = config_8b
    (tmp_path / "file").write_text("a file")
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    result = run_in_process(
        "fit", "recipes/8b.yaml", *overrides, f"output_dir={tmp_path / 'file' / 'out'}", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "\nverdict: " in result.stdout
    lines = result.stderr.splitlines()
    prefix = "mergeopt: warning: the fit would refuse this recipe: "
    assert lines == [
        *(f"{prefix}dev set {e!r} /path/to/dev/{e}.jsonl does not exist" for e in EXPERTS_8B),
        f"{prefix}output_dir {tmp_path / 'file' / 'out'} cannot be created: {tmp_path / 'file'} is a file, "
        "not a directory",
    ], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_dry_run_reads_the_dev_sets_as_the_fit_does(config_8b, tmp_path):
    """A ``save_to_disk`` dev set, which the fit reads, draws no warning (it once read "is a
    directory, not a file"), and a malformed JSONL line, which the fit refuses, draws one naming the
    line: the plan warns of what the fit would refuse, not of something else."""
    import datasets

    path, _ = config_8b
    datasets.Dataset.from_list([{"text": "a b c"}] * 4).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    dev = [f"data.dev.0.path={tmp_path / 'saved'}", f"data.dev.1.path={tmp_path / 'bad.jsonl'}"]
    result = run_in_process("plan", "recipes/8b.yaml", *overrides, *dev, f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert "saved" not in result.stderr
    prefix = "mergeopt: warning: the fit would refuse this recipe: "
    assert f"{prefix}{tmp_path / 'bad.jsonl'}:2: not valid JSON" in result.stderr, result.stderr


def test_plan_warns_of_a_custom_term_whose_function_does_not_import(config_8b, tmp_path):
    """The fit refuses a custom objective term whose function does not import (before stacking);
    the plan warns of it in the fit's words, and keeps quiet about one that imports."""
    path, _ = config_8b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    overrides += ["search.strategy=grid", f"output_dir={tmp_path / 'out'}"]
    term = "objective.terms=[{{kind: custom, dev: math, function: '{}'}}]"
    missing = run_in_process("plan", "recipes/8b.yaml", *overrides, term.format("no_such_module_xyz:score"))
    assert missing.returncode == 0, missing.stderr
    assert (
        "mergeopt: warning: the fit would refuse this recipe: custom metric 'no_such_module_xyz:score': "
        "cannot import module 'no_such_module_xyz'"
    ) in missing.stderr, missing.stderr
    found = run_in_process("plan", "recipes/8b.yaml", *overrides, term.format("math:sqrt"))
    assert found.returncode == 0, found.stderr
    assert "custom metric" not in found.stderr, found.stderr


def test_plan_warns_of_an_lm_eval_task_that_is_not_in_lm_evals_index(config_8b, tmp_path):
    """The fit refuses an lm_eval term whose task lm-eval does not know, before stacking; the plan
    said "fits" and nothing else. It now warns in the fit's words (from lm-eval's task index: no
    dataset is loaded), and keeps quiet about a task the index has."""
    pytest.importorskip("lm_eval")
    from tests.conftest import lm_eval_task_yaml

    path, _ = config_8b
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(
        lm_eval_task_yaml("mergeopt_plan_task", {"validation": tmp_path / "v.jsonl"})
    )
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    overrides += ["search.strategy=grid", f"output_dir={tmp_path / 'out'}"]
    term = "objective.terms=[{{kind: lm_eval, task: {}, include_path: '" + str(tasks) + "'}}]"
    missing = run_in_process("plan", "recipes/8b.yaml", *overrides, term.format("mergeopt_plan_tsak"))
    assert missing.returncode == 0, missing.stderr
    assert (
        "mergeopt: warning: the fit would refuse this recipe: objective term 'lm_eval:mergeopt_plan_tsak': "
        f"no lm-eval task 'mergeopt_plan_tsak' in {tasks} (did you mean 'mergeopt_plan_task'?)"
    ) in missing.stderr, missing.stderr
    found = run_in_process("plan", "recipes/8b.yaml", *overrides, term.format("mergeopt_plan_task"))
    assert found.returncode == 0, found.stderr
    assert "lm-eval task" not in found.stderr, found.stderr


def test_plan_warns_of_conversations_without_a_chat_template(config_8b, tmp_path):
    """A dev set of conversations and a base whose tokenizer files hold no chat template: the fit
    refuses it (after the tokenizer is loaded); the plan said nothing. It now warns in one line
    naming the dev set, from files only; a data.chat_template that holds one silences it, one that
    does not is named as the fit names it."""
    path, _ = config_8b
    chat = tmp_path / "chat.jsonl"
    message = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    chat.write_text(json.dumps(message) + "\n")
    argv = ["recipes/8b.yaml", f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    argv += [f"data.dev.{i}.path={chat}" for i in range(len(EXPERTS_8B))]
    argv.append(f"output_dir={tmp_path / 'out'}")
    prefix = "mergeopt: warning: the fit would refuse this recipe: "

    result = run_in_process("plan", *argv)
    assert result.returncode == 0 and "\nverdict: " in result.stdout, result.stderr
    names = ", ".join(f"dev set {e!r}" for e in EXPERTS_8B)
    assert result.stderr.splitlines() == [
        f"{prefix}{names} holds conversations, and the base's tokenizer has no chat template "
        f"(chat_template.jinja or tokenizer_config.json's chat_template in {path}): set "
        "data.chat_template to a Jinja file or to a directory whose tokenizer has one"
    ]
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert run_in_process("plan", *argv, f"data.chat_template={template}").stderr == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_in_process("plan", *argv, f"data.chat_template={empty}")
    assert result.stderr.splitlines() == [
        f"{prefix}data.chat_template: {empty} holds no chat template (chat_template.jinja or "
        "tokenizer_config.json's chat_template)"
    ]
    assert not (tmp_path / "out").exists()


def test_plan_takes_fits_out_as_its_output_dir(config_8b, tmp_path):
    """``plan --out DIR`` is ``fit --dry-run --out DIR``: DIR is the output_dir the plan checks the
    fit could write (here under a file: one warning naming it), and DIR with an output_dir= override
    as well is refused in one line; nothing is written."""
    path, _ = config_8b
    (tmp_path / "file").write_text("a file")
    out = tmp_path / "file" / "out"
    argv = ["recipes/8b.yaml", f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    planned = run_in_process("plan", *argv, "--out", str(out))
    dry_run = run_in_process("fit", *argv, "--out", str(out), "--dry-run")
    assert planned.returncode == dry_run.returncode == 0, planned.stderr
    assert "\nverdict: " in planned.stdout and planned.stderr == dry_run.stderr
    assert f"output_dir {out} cannot be created: {tmp_path / 'file'} is a file" in planned.stderr
    both = run_in_process("plan", *argv, f"output_dir={tmp_path / 'a'}", "--out", str(tmp_path / "b"))
    assert both.returncode == 2
    assert both.stderr.startswith("mergeopt: error: --out and a output_dir= override both name")
    assert len(both.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("what", ["no_config", "unknown_architecture", "world_not_built"])
def test_user_errors_are_one_line(what, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    if what == "unknown_architecture":
        (base / "config.json").write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 8}))
    args = [f"model.base={base}", f"world.cache_dir={tmp_path / 'cache'}"]
    if what != "world_not_built":
        args += [f"model.experts.{e}={base}" for e in ("arith", "reverse", "brackets", "markov")]
    code = run_cli(fit.main, [str(REPO / "recipes" / "tiny.yaml"), *args, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    expected = {
        "no_config": f"model.base: {base} has no config.json",
        "unknown_architecture": "cannot build the architecture on the meta device",
        "world_not_built": "tiny://experts/arith: the tiny world is not built yet and a plan builds nothing",
    }[what]
    assert expected in err
    assert not (tmp_path / "cache").exists()


def test_an_unbuilt_world_is_refused_naming_the_command_that_builds_it(tmp_path, capsys):
    """``mergeopt plan recipes/tiny.yaml`` before the tiny world is built: one line that says the fit
    builds it (it said "run once without --dry-run", an option the plan's command line never had)."""
    from mergeopt import cli

    code = cli.main(["plan", str(REPO / "recipes" / "tiny.yaml"), f"world.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "the tiny world is not built yet and a plan builds nothing (mergeopt fit of this recipe" in err
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- the flagship recipe

CONFIG_8B = "random://" + str(REPO / "tests" / "data" / "configs" / "llama-3.1-8b.json")
GPU_80GB = DeviceMemory("cuda:0", "an 80 GB card", 80 * 2**30, 79 * 2**30)


def _8b_plan(num_experts: int, stack_dtype: str):
    experts = "{" + ", ".join(f"e{i}: '{CONFIG_8B}'" for i in range(num_experts)) + "}"
    r = load_recipe(
        REPO / "recipes" / "8b.yaml",
        [f"model.base={CONFIG_8B}", f"model.experts={experts}", f"model.stack_dtype={stack_dtype}"],
    )
    inventory, dims = dry_run.read_inventory(r)
    return plan.plan_memory(r, inventory, dims, GPU_80GB)


def test_8b_recipe_as_shipped_plans_within_70_gib_on_one_gpu():
    """recipes/8b.yaml (four bfloat16 experts of Llama-3.1-8B's shapes, bfloat16 compute,
    checkpointed layers, chunked loss) on one 80 GB GPU: at most 70 GiB, the stack its largest part."""
    p = _8b_plan(4, "bfloat16")
    assert p.parameters == 8_030_261_248
    assert p.fits and p.peak <= 70 * 2**30, plan_table.gib(p.peak)
    assert p.row("stack differences") == 3 * p.stacked_parameters * 2
    assert max(r.bytes for r in p.phases) < 8 * 2**30


def test_8b_with_eight_int8_experts_plans_within_80_gib():
    p = _8b_plan(8, "int8")
    assert p.fits and p.peak <= 80 * 2**30, plan_table.gib(p.peak)
    # one byte per difference plus a float32 scale per expert and row
    assert p.row("stack differences") < 7 * p.stacked_parameters * 1.01


def test_device_memory_plans_for_a_gpu_that_is_not_here(capsys):
    """``mergeopt plan --device-memory GIB`` checks the plan against a device of that size, all free,
    as if it were here: the verdict and the suggestions are the plan's against such a device."""
    experts = ",".join(f"{name}: '{CONFIG_8B}'" for name in ("a", "b", "c", "d"))
    args = [str(REPO / "recipes" / "8b.yaml"), f"model.base={CONFIG_8B}", f"model.experts={{{experts}}}"]
    r = load_recipe(REPO / "recipes" / "8b.yaml", args[1:])
    inventory, dims = dry_run.read_inventory(r)
    for gib, fits in ((79, True), (40, False)):
        code = run_cli(fit.main, [*args, "--dry-run", "--device-memory", str(gib)])
        out = capsys.readouterr().out
        assert code == 0
        given = DeviceMemory.given("cuda", gib)  # device: auto plans for a GPU
        assert given.total == given.free == gib * 2**30
        expected = plan.plan_memory(r, inventory, dims, given)
        assert expected.fits is fits
        assert f"verdict: {plan_table.verdict(expected)}" in out
        assert f"device: cuda: as given by --device-memory, {gib}.00 GiB total" in out
    assert "does not fit: short by" in out and "model.stack_dtype=int8" in out  # 40 GiB: suggestions
    assert run_cli(fit.main, [*args, "--device-memory", "79"]) == 2  # a plan's option, not a fit's
    assert "--device-memory plans a --dry-run" in capsys.readouterr().err


def test_a_plan_that_does_not_fit_names_the_fewest_gpus_that_hold_it_sharded(capsys):
    """Eight bfloat16 experts of Llama-3.1-8B on one 80 GB GPU do not fit, knobs or not; the plan
    names the fewest GPUs over which model.shard=fsdp fits the recipe as written, with the peak per
    GPU that plan gives (re-planned: the same as --world-size N model.shard=fsdp), and one GPU fewer
    of RANK_COUNTS does not fit. On the CPU, whose processes share one memory, nothing is named."""
    p = _8b_plan(8, "bfloat16")
    assert not p.fits and p.sharded_fit is not None
    ranks, peak = p.sharded_fit
    experts = "{" + ", ".join(f"e{i}: '{CONFIG_8B}'" for i in range(8)) + "}"
    r = load_recipe(REPO / "recipes" / "8b.yaml", [f"model.base={CONFIG_8B}", f"model.experts={experts}"])
    inventory, dims = dry_run.read_inventory(r)
    sharded = r.model_copy(update={"model": r.model.model_copy(update={"shard": "fsdp"})})
    assert plan.plan_memory(sharded, inventory, dims, GPU_80GB, ranks).peak == peak <= GPU_80GB.free
    fewer = [n for n in plan.RANK_COUNTS if n < ranks]
    assert all(plan.plan_memory(sharded, inventory, dims, GPU_80GB, n).peak > GPU_80GB.free for n in fewer)
    assert (ranks, round(peak / 2**30, 2)) == (2, 56.13)
    assert (
        f"  or, as written, model.shard=fsdp over 2 GPUs under torchrun: peak {plan_table.gib(peak)} GiB per GPU"
        in plan_table.verdict(p)
    )
    assert "fewer experts or more GPUs" in plan_table.verdict(dataclasses.replace(p, suggestions=()))
    cpu = DeviceMemory("cpu", "a small machine", GPU_80GB.total, GPU_80GB.free)
    assert plan.plan_memory(r, inventory, dims, cpu).sharded_fit is None
    # planned for 4 ranks that each hold the whole stack, the fewest that hold it sharded are
    # still 2 (it used to name 8, the first count above the job's); sharded already over 2 ranks
    # of 40 GB, the answer is more ranks than 2
    assert plan.plan_memory(r, inventory, dims, GPU_80GB, 4).sharded_fit == (2, peak)
    small = DeviceMemory("cuda:0", "a 40 GB card", 40 * 2**30, 40 * 2**30)
    more = plan.plan_memory(sharded, inventory, dims, small, 2)
    assert not more.fits and more.sharded_fit is not None and more.sharded_fit[0] > 2
    assert more.sharded_fit == plan.plan_memory(r, inventory, dims, small).sharded_fit


# ----------------------------------------------------------------------------- per rank (model.shard)

LLAMA_70B = dict(
    LLAMA_8B,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
)
# Llama-3.1-70B per layer: q and o 8192², k and v 1024 × 8192, gate, up and down 8192 × 28672
STACKED_70B = 80 * (2 * 8192**2 + 2 * 1024 * 8192 + 3 * 8192 * 28672)
PARAMETERS_70B = STACKED_70B + 2 * 128256 * 8192 + (2 * 80 + 1) * 8192  # + embeddings, output, norms
EXCLUDED = ("embed_tokens", "lm_head", "norm")  # what recipes/8b.yaml and recipes/70b.yaml keep at θ0
GPU_24GB = DeviceMemory("cuda:0", "a 24 GB consumer card", 24 * 2**30, 23 * 2**30 + 2**29)


@pytest.fixture(scope="module")
def config_70b(tmp_path_factory):
    """Llama-3.1-70B's config.json alone (no weights) and its parameter shapes built on the meta device."""
    path = tmp_path_factory.mktemp("llama70b")
    LlamaConfig(**LLAMA_70B).save_pretrained(path)
    return path, meta_shapes(LLAMA_70B)


def _recipe_70b(path, *overrides: str):
    experts = [f"model.experts.{e}={path}" for e in EXPERTS_8B]
    return load_recipe(REPO / "recipes" / "70b.yaml", [f"model.base={path}", *experts, *overrides])


def per_rank(shapes: dict, names, ranks: int) -> tuple[int, int]:
    """(elements, int8 scale rows) one of ``ranks`` ranks keeps of these tensors, counted here from
    the layout: ⌈R/N⌉ of the R rows of each matrix, padding included, and every vector whole."""
    elements = scale_rows = 0
    for name in names:
        shape = shapes[name]
        if len(shape) >= 2:  # a fused (experts, out, in) weight: a scale per expert and output
            rows = -(-shape[0] // ranks)
            elements += rows * math.prod(shape[1:])
            scale_rows += rows * math.prod(shape[1:-1])
        else:
            elements += math.prod(shape)
            scale_rows += 1
    return elements, scale_rows


def test_70b_four_bfloat16_experts_fit_8_ranks_of_80_gb_sharded_and_not_whole(config_70b):
    """recipes/70b.yaml (four bfloat16 experts of Llama-3.1-70B's shapes, bfloat16 compute,
    checkpointed layers, a micro-batch of 2 × 4 dev sets = 8 sequences of 1,024 tokens) on 8 GPUs
    of 80 GB: sharded, each rank holds 1/8 of the stack and the plan fits; with model.shard none
    every rank holds the whole stack (519 GiB) and it does not, and sharding is the first knob."""
    path, shapes = config_70b
    r = _recipe_70b(path)
    assert r.model.shard == "fsdp" and r.model.stack_dtype == "bfloat16"
    assert r.optim.activation_checkpointing and r.search.strategy == "gradient"
    inventory, dims = dry_run.read_inventory(r)
    assert dims == Dims(8192, 28672, 80, 64, 8, 128, 128256)
    sharded = plan.plan_memory(r, inventory, dims, GPU_80GB, 8)
    assert sharded.parameters == sum(math.prod(s) for s in shapes.values()) == PARAMETERS_70B
    assert sharded.stacked_parameters == STACKED_70B
    stack = 4 * 2 * STACKED_70B // 8  # anchor and 3 differences, 2 bytes each, over 8 ranks (all rows divide)
    assert sharded.row("stack anchor") + sharded.row("stack differences") == stack
    assert sharded.fits and sharded.peak <= GPU_80GB.free, plan_table.gib(sharded.peak)
    assert sharded.batch.startswith("micro-batch 8 x 1024 tokens over 8 ranks, 1 per rank;")
    whole = plan.plan_memory(_recipe_70b(path, "model.shard=none"), inventory, dims, GPU_80GB, 8)
    assert whole.row("stack anchor") + whole.row("stack differences") == 4 * 2 * STACKED_70B
    assert whole.fits is False and whole.suggestions[0][0] == "model.shard=fsdp"
    # the batches split the same way: the phases differ only by what sharding gathers
    assert whole.row("training step") < sharded.row("training step") < whole.row("training step") + 4 * 2**30


def test_8b_four_int8_experts_fit_2_consumer_gpus_of_24_gb_and_not_one(config_8b):
    """Llama-3.1-8B, four int8 experts (recipes/8b.yaml otherwise) on 2 × 24 GB: each rank's peak,
    the largest phase included, is under 24 GB; one GPU (no sharding) is far from it."""
    path, _ = config_8b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    r = load_recipe(REPO / "recipes" / "8b.yaml", [*overrides, "model.stack_dtype=int8", "model.shard=fsdp"])
    inventory, dims = dry_run.read_inventory(r)
    two = plan.plan_memory(r, inventory, dims, GPU_24GB, 2)
    assert two.fits and two.peak <= 24 * 10**9, plan_table.gib(two.peak)
    assert two.batch.startswith("micro-batch 8 x 1024 tokens over 2 ranks, 4 per rank;")
    one = load_recipe(REPO / "recipes" / "8b.yaml", [*overrides, "model.stack_dtype=int8"])
    alone = plan.plan_memory(one, inventory, dims, GPU_24GB, 1)
    assert alone.fits is False and alone.peak > 30 * 10**9, plan_table.gib(alone.peak)


@pytest.mark.parametrize(
    "name,ranks,overrides,fits",
    [
        ("mixtral-8x7b", 8, (), True),  # 51 GiB per rank
        ("mixtral-8x7b", 4, (), False),  # 95 GiB
        ("mixtral-8x7b", 4, ("model.stack_dtype=int8",), True),  # 63 GiB
        ("qwen3-30b-a3b", 4, (), True),  # 60 GiB
        ("qwen3-30b-a3b", 1, ("model.stack_dtype=int8", "model.shard=none"), False),  # 146 GiB
        ("glm-4.5-air", 8, (), False),  # 109 GiB
        ("glm-4.5-air", 8, ("model.stack_dtype=int8",), True),  # 72 GiB
    ],
)
def test_mixture_of_experts_models_plan_per_rank(tmp_path, name, ranks, overrides, fits):
    """recipes/70b.yaml with four experts of Mixtral-8x7B's, Qwen3-30B-A3B's or GLM-4.5-Air's
    shapes (their published config.json, tests/data/configs) on GPUs of 80 GB: the fused (experts,
    out, in) weights are stacked and sharded by their first dimension as every matrix, int8 scales
    per expert and output channel; which layouts fit. GLM-4.5-Air's first layer is dense, its
    rotary embedding covers half of each head and its shared expert is as wide as a routed one."""
    (tmp_path / "config.json").write_text((REPO / "tests" / "data" / "configs" / f"{name}.json").read_text())
    experts = [f"model.experts.{e}={tmp_path}" for e in EXPERTS_8B]
    r = load_recipe(REPO / "recipes" / "70b.yaml", [f"model.base={tmp_path}", *experts, *overrides])
    inventory, dims = dry_run.read_inventory(r)
    assert dims.profile.moe and dims.top_k == (2 if name.startswith("mixtral") else 8)
    assert not any(n.startswith("note: activations") for n in inventory.notes)
    if name == "glm-4.5-air":
        assert (dims.dense_layers, dims.rotary_width, dims.shared_intermediate) == (1, 64, 1408)
    fused = [n for n, shape in inventory.shapes.items() if len(shape) == 3]
    assert len(fused) == 2 * (dims.layers - dims.dense_layers)  # gate_up_proj and down_proj of each MoE layer
    p = plan.plan_memory(r, inventory, dims, GPU_80GB, ranks)
    stacked = [n for n in inventory.shapes if not any(x in n for x in EXCLUDED)]
    elements, scale_rows = per_rank(inventory.shapes, stacked, ranks)
    int8 = r.model.stack_dtype == "int8"
    assert p.row("stack anchor θ_1") == 2 * elements
    assert p.row("stack differences") == 3 * elements * (1 if int8 else 2) + (
        3 * scale_rows * 4 if int8 else 0
    )
    assert p.fits is fits, plan_table.gib(p.peak)


@pytest.mark.parametrize(
    "model,ranks,dtype",
    [("70b", 8, "bfloat16"), ("8b", 3, "int8"), ("8b", 5, "bfloat16"), ("8b", 2, "float32")],
)
def test_per_rank_rows_are_the_blocks_of_rows_of_every_tensor(config_8b, config_70b, model, ranks, dtype):
    """Each held row equals Σ over the tensors of ⌈R/N⌉ · columns · bytes (vectors whole), counted
    here from the meta model's shapes; 3 and 5 ranks leave padding rows (4096, 1024 and 14336 rows
    do not divide), and int8 adds a float32 scale per expert and held row."""
    if model == "70b":
        path, shapes = config_70b
    else:
        path, _ = config_8b
        shapes = meta_shapes(LLAMA_8B)
    experts = {e: str(path) for e in EXPERTS_8B}
    r = recipe(
        str(path), experts, stack_dtype=dtype, exclude=list(EXCLUDED), shard="fsdp", compute_dtype="bfloat16"
    )
    # a micro-batch that splits over 2, 3, 5 and 8 ranks
    r = r.model_copy(update={"optim": r.optim.model_copy(update={"batch_size": 120})})
    inventory, dims = dry_run.read_inventory(r)
    p = plan.plan_memory(r, inventory, dims, ROOMY, ranks)
    stacked = [n for n in shapes if not any(x in n for x in EXCLUDED)]
    unstacked = [n for n in shapes if n not in stacked]
    elements, scale_rows = per_rank(shapes, stacked, ranks)
    size = {"float32": 4, "bfloat16": 2, "int8": 1}[dtype]
    anchor = 2 if dtype == "int8" else size  # an int8 stack keeps its anchor in the compute dtype
    scales = 3 * scale_rows * 4 if dtype == "int8" else 0
    assert p.row("stack anchor θ_1") == anchor * elements
    assert p.row("stack differences") == 3 * elements * size + scales
    assert p.row("model parameters not stacked") == 2 * per_rank(shapes, unstacked, ranks)[0]
    assert p.row("optimizer") == 4 * 8 * 4
    whole = plan.plan_memory(
        r.model_copy(update={"model": r.model.model_copy(update={"shard": "none"})}),
        inventory,
        dims,
        ROOMY,
        ranks,
    )
    assert elements * ranks >= whole.stacked_parameters > elements * (ranks - 1)
    labels = [row.label for row in p.held]
    assert (
        f"stack anchor θ_1, {'bfloat16' if dtype == 'int8' else dtype}, sharded: 1/{ranks} of the rows per rank"
        in labels
    )
    assert "model parameters not stacked, bfloat16: vectors whole, matrices sharded" in labels
    assert "optimizer: Adam on 4 float64 logits, whole on every rank" in labels


def test_sharded_lora_factors_are_blocks_of_their_rows(tmp_path, config_8b):
    """LoRA experts kept low-rank: per module the stacked A (Σr × in) and B (out × Σr) are held as
    blocks of ⌈rows/N⌉ rows, the owner and scaling of every rank column whole."""
    from mergeopt.loading.lora_sizes import factor_sizes

    path, _ = config_8b
    modules = {
        "model.layers.0.self_attn.q_proj": (8, 4096, 4096),
        "model.layers.0.mlp.down_proj": (5, 14336, 4096),
    }
    adapters = {}
    for e, extra in zip(EXPERTS_8B, (0, 3, 6, 1)):
        tensors = {}
        for module, (r, inputs, outputs) in modules.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(r + extra, inputs)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(outputs, r + extra)
        (tmp_path / e).mkdir()
        save_file(tensors, str(tmp_path / e / "adapter_model.safetensors"))
        adapters[e] = factor_sizes(tmp_path / e)
    key = "base_model.model.model.layers.0.mlp.down_proj"
    assert adapters["code"].modules[key] == (8, 14336, 4096)
    r = recipe(str(path), {e: str(path) for e in EXPERTS_8B}, shard="fsdp", compute_dtype="bfloat16")
    r = r.model_copy(update={"optim": r.optim.model_copy(update={"batch_size": 9})})  # 3 per rank
    inventory, dims = dry_run.read_inventory(r)
    inventory = dataclasses.replace(inventory, adapters=adapters)
    ranks = 3
    p = plan.plan_memory(r, inventory, dims, ROOMY, ranks)
    expected = 0
    for r_, inputs, outputs in modules.values():
        total = 4 * r_ + 0 + 3 + 6 + 1  # Σ over the experts of their ranks at this module
        expected += (-(-total // ranks) * inputs + -(-outputs // ranks) * total) * 4 + total * (8 + 4)
    assert (
        p.row("LoRA factors of 4 expert(s), float32, kept low-rank, sharded: 1/3 of the rows per rank")
        == expected
    )
    assert p.stacked_parameters == 0
    # stacking reads each expert's factors whole once and keeps the rank's rows: nothing is stacked densely
    whole = sum((4 * r_ + 10) * (inputs + outputs) * 4 for r_, inputs, outputs in modules.values())
    local = expected - sum((4 * r_ + 10) * (8 + 4) for r_, _, _ in modules.values())
    assert p.row("stacking") == whole - local


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_sharded_stacking_holds_a_block_or_one_whole_tensor(config_8b, method):
    """The linear merge stacks each rank's rows alone: its temporaries shrink with the ranks; TIES
    prepares each tensor whole (every rank the same) and keeps its block: as without sharding."""
    path, _ = config_8b
    r = recipe(
        str(path), dict.fromkeys(EXPERTS_8B, str(path)), exclude=list(EXCLUDED), compute_dtype="bfloat16"
    )
    r = r.model_copy(update={"merge": MergeSection(method=method, scale=1.0 if method == "linear" else 0.5)})
    inventory, dims = dry_run.read_inventory(r)
    sharded = r.model_copy(update={"model": r.model.model_copy(update={"shard": "fsdp"})})
    one = plan.plan_memory(r, inventory, dims, ROOMY).row("stacking")
    four = plan.plan_memory(sharded, inventory, dims, ROOMY, 4).row("stacking")
    assert four == (one // 4 if method == "linear" else one)  # the largest matrix, 14336 rows, divides by 4


def test_random_8b_recipe_plans_per_rank_from_the_command_line():
    """A random:// world of Llama-3.1-8B's shapes planned for 4 ranks: no weights anywhere."""
    experts = "{" + ", ".join(f"{e}: '{CONFIG_8B}'" for e in EXPERTS_8B) + "}"
    result = run_in_process(
        "fit",
        "recipes/8b.yaml",
        f"model.base={CONFIG_8B}",
        f"model.experts={experts}",
        "--dry-run",
        "--world-size",
        "4",
        "model.shard=fsdp",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Memory plan for recipes/8b.yaml, per rank, 4 ranks (dry run:"), out
    assert "ranks: 4, model.shard fsdp: each rank holds a block of 1/4 of the rows" in out
    assert "micro-batch 8 x 1024 tokens over 4 ranks, 2 per rank" in out
    anchor = plan_table.gib(2 * 6_979_321_856 // 4)  # every stacked row count of the 8B divides by 4
    assert re.search(
        rf"\n  stack anchor θ_1, bfloat16, sharded: 1/4 of the rows per rank +{anchor}\n", out
    ), out
    assert "\npeak per rank " in out


def test_70b_recipe_dry_run_from_config_json_alone(config_70b, tmp_path):
    path, _ = config_70b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    result = run_in_process(
        "fit",
        "recipes/70b.yaml",
        *overrides,
        f"output_dir={tmp_path / 'out'}",
        "--dry-run",
        "--world-size",
        "8",
    )
    assert result.returncode == 0, result.stderr
    assert "Memory plan for recipes/70b.yaml, per rank, 8 ranks" in result.stdout
    assert f"parameters: {PARAMETERS_70B:,} in 723 tensors (config.json of" in result.stdout
    assert f"stacked: {STACKED_70B:,} in 560 tensors x 4 experts" in result.stdout
    assert not (tmp_path / "out").exists()


def test_world_size_comes_from_the_environment_without_the_option(config_8b, monkeypatch, capsys):
    path, _ = config_8b
    args = [
        str(REPO / "recipes" / "8b.yaml"),
        f"model.base={path}",
        *(f"model.experts.{e}={path}" for e in EXPERTS_8B),
    ]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert run_cli(fit.main, [*args, "model.shard=fsdp", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per rank, 4 ranks" in out and "1/4 of the rows per rank" in out
    assert run_cli(fit.main, [*args, "model.shard=fsdp", "--dry-run", "--world-size", "2"]) == 0
    assert "per rank, 2 ranks" in capsys.readouterr().out  # the option wins
    assert run_cli(fit.main, [*args, "--dry-run"]) == 0  # unsharded: per rank too, each holds everything
    out = capsys.readouterr().out
    assert (
        "per rank, 4 ranks" in out and "model.shard none: every rank holds the whole model and stack" in out
    )
    monkeypatch.delenv("WORLD_SIZE")
    assert run_cli(fit.main, [*args, "--dry-run"]) == 0
    assert "per rank" not in capsys.readouterr().out


def _dry_run_8b(config_8b, *overrides: str) -> list[str]:
    """``fit recipes/8b.yaml --dry-run`` on the config-only 8B base and experts, with ``overrides``."""
    path, _ = config_8b
    experts = (f"model.experts.{e}={path}" for e in EXPERTS_8B)
    return [str(REPO / "recipes" / "8b.yaml"), f"model.base={path}", *experts, *overrides, "--dry-run"]


def test_a_dry_run_under_torchrun_is_printed_by_rank_0_only(config_8b, monkeypatch, capsys):
    """`torchrun ... -m mergeopt.fit RECIPE --dry-run` printed the same plan once per rank."""
    args = _dry_run_8b(config_8b)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run_cli(fit.main, args) == 0
        assert ("per rank, 2 ranks" in capsys.readouterr().out) is printed
        assert run_cli(fit.main, [*args, "--json"]) == 0
        assert bool(capsys.readouterr().out) is printed
    monkeypatch.setenv("WORLD_SIZE", "3")  # 2 x 4 dev sets do not split over 3 ranks: every rank says so
    assert run_cli(fit.main, [*args, "model.shard=fsdp"]) == 2
    assert "does not split evenly" in capsys.readouterr().err


def test_check_shard_division_names_the_numbers_and_a_batch_size_that_splits(config_8b):
    path, _ = config_8b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B), "model.shard=fsdp"]
    r = load_recipe(REPO / "recipes" / "8b.yaml", [*overrides, "optim.batch_size=6"])  # 24 examples
    with pytest.raises(UserError) as err:
        check_shard_division(r, 16)
    message = str(err.value)
    assert "\n" not in message
    assert (
        "model.shard fsdp over 16 ranks: a micro-batch of 24 examples (optim.batch_size 6 × 4 dev sets)"
        in message
    )
    assert "optim.batch_size=8: 2 per rank" in message  # 8 × 4 = 32 = 2 × 16
    check_shard_division(r, 8)  # 24 = 3 × 8
    check_shard_division(r.model_copy(update={"model": r.model.model_copy(update={"shard": "none"})}), 16)


# ----------------------------------------------------------------------------- per rank, measured

# The phases of a sharded stack measured on its ranks: gloo processes, 3 of them (no row count of
# these shapes divides by 3: every block is padded) and then 2, each rank's live bytes against the
# plan of the same shapes for that many ranks. As above: (vocab, hidden, intermediate, stack
# dtype, compute dtype), then the micro-batch per rank, the length, the activation checkpointing
# settings of the training steps measured, the eval dtypes of the evaluations measured and what
# model.exclude keeps at θ0 (sharded all the same, gathered whole when read).
RANK_CASES = (
    (2000, 64, 176, "float32", "float32", 2, 50, (False, True), ("float32",), ()),  # the loss's chunks
    (8000, 64, 176, "float32", "float32", 2, 50, (False, True), (), ()),  # the merged output layer
    (100, 256, 704, "float32", "float32", 2, 60, (False, True), ("float32",), ()),  # layer activations
    (100, 256, 704, "bfloat16", "bfloat16", 2, 60, (True,), ("bfloat16",), ()),
    (100, 256, 704, "int8", "bfloat16", 2, 60, (), ("bfloat16", "float32"), ()),
    (8000, 64, 176, "bfloat16", "bfloat16", 2, 60, (), ("bfloat16", "float32"), ()),
    (4000, 64, 176, "int8", "float32", 1, 8, (False,), (), ()),  # one merge in flight
    (2000, 64, 176, "float32", "float32", 2, 50, (False, True), ("float32",), EXCLUDED),  # head not merged
    (8000, 64, 176, "bfloat16", "bfloat16", 2, 60, (True,), ("float32",), EXCLUDED),  # as recipes/70b.yaml
)
RANK_SIZES = (3, 2)
EVAL_BATCH = 4  # sequences per rank


def _measure_rank(case, rank: int, size: int) -> dict:
    """Live peaks of one rank: stacking its blocks, a training micro-step on its share of the
    micro-batch (each setting of checkpointing), an evaluation batch (each eval dtype)."""
    from mergeopt.merging.sharded_merge import block_range, gather_rows
    from mergeopt.objectives.data import rank_batch

    vocab, hidden, intermediate, dtype, compute, batch, length, checkpointed, evaluated, exclude = case
    shard = (rank, size)
    model, stack, _, build = small_problem(
        vocab, hidden, intermediate, dtype, compute=compute, shard=shard, exclude=exclude
    )
    stacked = {t.untyped_storage().data_ptr() for t in stack.anchor.values()}
    unstacked = [p for p in model.parameters() if p.untyped_storage().data_ptr() not in stacked]
    got = {
        "stack": stack.nbytes(),
        "stacking": build,
        "not stacked": sum(p.numel() * p.element_size() for p in unstacked),
        # the blocks of the excluded matrices, cut from θ0 while stacking (vectors stay as loaded)
        "blocks made": sum(p.numel() * p.element_size() for p in unstacked if p.dim() >= 2),
    }
    known = [*model.parameters(), *model.buffers(), *_stacked_tensors(stack)]
    # each rank's share (every size-th example) and evaluation batch: the lengths of one process's
    # batch (its longest is data.max_length, as the plan assumes)
    share = rank_batch([x for x in padded_items(batch, length, vocab) for _ in range(size)], pad_id=0)
    for c in checkpointed:
        (checkpointing.enable if c else checkpointing.disable)(model)
        z = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        with RankBytes([*known, z]) as step:
            dev_loss(model, stack, z, share, torch.ones(1), 64).backward()
        got[f"training {c}"] = step.peak
    checkpointing.disable(model)
    examples = (
        [e for _, e in padded_items(EVAL_BATCH, length, vocab) for _ in range(size)] if evaluated else []
    )
    sets = [DevSet(name="a", weight=1.0, fit=examples, heldout=[])]
    for e in evaluated:
        stack.eval_dtype = DTYPES[e]
        with RankBytes(known) as evaluation:
            evaluate_sums(
                model, stack, torch.full((4,), 0.25), sets, "fit", EVAL_BATCH, 0, torch.device("cpu"), 64
            )
        got[f"evaluation {e}"] = evaluation.peak
    # the all-gather's buffer is counted: the output layer's blocks gathered whole
    block = model.lm_head.parametrizations.weight.original
    with RankBytes(known) as gather:
        gather_rows(block, vocab)
    start, stop, per = block_range(vocab, rank, size)
    got["gather"] = [gather.peak, size * block.numel() * block.element_size(), stop - start < per]
    return got


def _rank_worker(rank: int, ports: tuple[int, int], out: str) -> None:
    """Rank ``rank`` of 3 gloo processes: every case on 3 ranks, then on 2 (ranks 0 and 1)."""
    torch.set_num_threads(1)
    for size, port in zip(RANK_SIZES, ports):
        if rank >= size:
            return
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        try:
            measured = [_measure_rank(case, rank, size) for case in RANK_CASES]
            ranks = [None] * size
            dist.all_gather_object(ranks, measured)
            if rank == 0:
                (Path(out) / f"{size}.json").write_text(json.dumps(ranks))
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_peaks(tmp_path_factory) -> dict[int, list[list[dict]]]:
    """{world size: [rank: [case: measured]]}, from 3 gloo processes (forked: tests.conftest.fork_ranks)."""
    from tests.conftest import free_port

    assert not dist.is_initialized()
    out = tmp_path_factory.mktemp("ranks")
    ports = (free_port(), free_port())
    assert ports[0] != ports[1]
    fork_ranks(_rank_worker, args=(ports, str(out)), nprocs=max(RANK_SIZES))
    return {size: json.loads((out / f"{size}.json").read_text()) for size in RANK_SIZES}


def rank_plan(case, size: int, checkpointed: bool = False, evaluate: str = "float32") -> MemoryPlan:
    """The dry run's plan for one of ``size`` ranks of ``case``, from the model's meta shapes."""
    vocab, hidden, intermediate, dtype, compute, batch, length, *_, exclude = case
    fields = small_fields(vocab, hidden, intermediate)
    shapes = meta_shapes(fields)
    inventory = Inventory(shapes, dict.fromkeys(shapes, 0), "meta")  # in-memory experts: no read buffer
    r = small_recipe(
        dtype,
        compute,
        length,
        activation_checkpointing=checkpointed,
        batch_size=batch * size,
        eval_batch_size=EVAL_BATCH,
    )
    model = {"shard": "fsdp", "eval_dtype": evaluate, "exclude": exclude}
    r = r.model_copy(update={"model": r.model.model_copy(update=model)})
    dims = Dims.from_config(LlamaConfig(**fields).to_dict(), "test")
    return plan.plan_memory(r, inventory, dims, ROOMY, size)


def _phases(kind: str):
    """(world size, case, setting) of each measured phase of ``kind``, with readable ids."""
    params = []
    for size in RANK_SIZES:
        for i, case in enumerate(RANK_CASES):
            vocab, hidden, intermediate, dtype, compute = case[:5]
            name = f"{size}ranks-{vocab}x{hidden}x{intermediate}-{dtype}-{compute}"
            name += "-excluded" if case[9] else ""
            settings = {"training": case[7], "evaluation": case[8], "stacking": (None,)}[kind]
            params += [
                pytest.param(size, i, s, id=f"{name}-{s}" if s is not None else name) for s in settings
            ]
    return params


def largest_rank(rank_peaks, size: int, case: int, phase: str) -> int:
    """The largest of the ranks' live peaks of a phase: the plan is per rank, an upper bound on each
    rank and held to the single-process tolerance on the largest (the ranks differ where a rank's
    block is short of ⌈R/N⌉ rows)."""
    return max(ranks[case][phase] for ranks in rank_peaks[size])


@pytest.mark.parametrize("size,case,checkpointed", _phases("training"))
def test_sharded_training_step_estimate_bounds_each_ranks_live_bytes(rank_peaks, size, case, checkpointed):
    """dev_loss + backward on each rank's share of the micro-batch, the rank's blocks gathered and
    its gradients reduce-scattered: the plan's training step for that many ranks."""
    estimate = rank_plan(RANK_CASES[case], size, checkpointed).row("training step")
    assert_bound(estimate, largest_rank(rank_peaks, size, case, f"training {checkpointed}"), 0.05, 0.15)


@pytest.mark.parametrize("size,case,evaluate", _phases("evaluation"))
def test_sharded_evaluation_estimate_bounds_each_ranks_live_bytes(rank_peaks, size, case, evaluate):
    """A no-grad evaluation batch of optim.eval_batch_size sequences on each rank."""
    estimate = rank_plan(RANK_CASES[case], size, evaluate=evaluate).row("evaluation batch")
    assert_bound(estimate, largest_rank(rank_peaks, size, case, f"evaluation {evaluate}"), 0.15, 0.15)


@pytest.mark.parametrize("size,case,_", _phases("stacking"))
def test_sharded_stacking_estimate_bounds_each_ranks_live_bytes(rank_peaks, size, case, _):
    """Each rank stacks its blocks of rows: its own stack (and the blocks of the matrices kept at θ0,
    cut from the model loaded whole) plus the plan's stacking row; the held rows are the rank's."""
    p = rank_plan(RANK_CASES[case], size)
    for ranks in rank_peaks[size]:
        assert ranks[case]["stack"] == p.row("stack anchor") + p.row("stack differences")
        assert ranks[case]["not stacked"] == p.row("model parameters not stacked")
    held = rank_peaks[size][0][case]["stack"] + rank_peaks[size][0][case]["blocks made"]  # every rank's
    assert_bound(held + p.row("stacking"), largest_rank(rank_peaks, size, case, "stacking"), 0.01, 0.15)


def test_each_rank_counts_the_all_gather_buffer(rank_peaks):
    """gather_rows's whole buffer (N blocks of the output layer) comes out of a dispatched op: the
    count sees it, and on a rank whose block is short of ⌈R/N⌉ rows one block more (its padded copy)."""
    for size in RANK_SIZES:
        for measured in rank_peaks[size]:
            for case in measured:
                peak, gathered, short = case["gather"]
                assert gathered <= peak <= gathered + (gathered // size if short else 0)


def test_the_moe_recipe_plans_what_its_comments_say(tmp_path):
    """recipes/moe.yaml (four bfloat16 experts of Qwen3-30B-A3B's published shapes, sharded over 4
    ranks): its comments' numbers, 60 GiB per rank of 80 GB (the stack 56 GiB, a float32
    evaluation batch 4 GiB: its experts' outputs, routed copies of the hidden size in float32, put
    back in the tokens' order) and 39 GiB with an int8 stack."""
    (tmp_path / "config.json").write_text(
        (REPO / "tests" / "data" / "configs" / "qwen3-30b-a3b.json").read_text()
    )
    experts = [f"model.experts.{e}={tmp_path}" for e in EXPERTS_8B]
    peaks = {}
    for dtype in ("bfloat16", "int8"):
        r = load_recipe(
            REPO / "recipes" / "moe.yaml", [f"model.base={tmp_path}", *experts, f"model.stack_dtype={dtype}"]
        )
        assert r.model.shard == "fsdp" and r.optim.activation_checkpointing
        inventory, dims = dry_run.read_inventory(r)
        p = plan.plan_memory(r, inventory, dims, GPU_80GB, 4)
        assert p.fits and dims.profile.moe
        peaks[dtype] = p.peak / 2**30
        if dtype == "bfloat16":
            stack = (p.row("stack anchor") + p.row("stack differences")) / 2**30
            assert round(stack) == 56 and round(p.row("evaluation batch") / 2**30) == 4
    assert round(peaks["bfloat16"]) == 60 and round(peaks["int8"]) == 39, peaks


def test_suggested_exclusion_keeps_a_pattern_yaml_would_misread(config_8b):
    """An exclusion regex with YAML's flow indicators (``layers\\.3[01]\\.``): the suggestion that
    excludes the embeddings too, typed into a shell as the table prints it, is read back as the
    same patterns and re-plans to the saving shown (it was ``[norm,layers\\.3[01]\\.,...]``, which
    the override refused as invalid YAML)."""
    import shlex

    path, _ = config_8b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B)]
    patterns = ["norm", r"layers\.3[01]\.", "a,b", "true"]
    overrides.append(f"model.exclude={json.dumps(patterns)}")
    r = load_recipe(REPO / "recipes" / "8b.yaml", overrides)
    inventory, dims = dry_run.read_inventory(r)
    card = DeviceMemory("cuda:0", "a 40 GB card", 40 * 2**30, 40 * 2**30)
    short = plan.plan_memory(r, inventory, dims, card)
    override, saved = next((k, v) for k, v in short.suggestions if k.startswith("model.exclude="))
    line = next(x for x in plan_table.verdict(short).splitlines() if "model.exclude=" in x)
    typed = shlex.split(line)[0]
    assert typed == override
    changed = load_recipe(REPO / "recipes" / "8b.yaml", [*overrides, typed])
    assert list(changed.model.exclude) == [*patterns, "embed_tokens", "lm_head"]
    assert plan.plan_memory(changed, inventory, dims, card).peak == short.peak - saved > 0


def test_a_dry_run_under_torchrun_warns_from_rank_0_only(config_8b, monkeypatch, capsys):
    """The plan's own warnings (an exclude pattern matching nothing, a precision mismatch) were
    still printed by every rank once only rank 0 printed the plan."""
    args = _dry_run_8b(config_8b, "model.exclude=[lm-head]")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, warned in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run_cli(fit.main, args) == 0
        assert ("model.exclude 'lm-head'" in capsys.readouterr().err) is warned


def test_the_plan_of_a_gguf_base_names_the_gguf_file_not_safetensors_headers(tmp_path):
    """A GGUF base (model.gguf_file) was planned 'from safetensors headers of base, 1 file'."""
    gguf = tmp_path / "base" / "model.Q4_1.gguf"
    tensors = {"lm_head.weight": checkpoints.TensorMeta(gguf, (8, 4), "F32")}
    base = checkpoints.Checkpoint(path=gguf.parent, config={}, tensors=tensors)
    inventory = dry_run.header_inventory(base)
    assert inventory.source == f"GGUF metadata of {gguf}: the model it describes"
    stored = tmp_path / "st"
    tensors = {"w": checkpoints.TensorMeta(stored / "model.safetensors", (8, 4), "F32")}
    inventory = dry_run.header_inventory(checkpoints.Checkpoint(path=stored, config={}, tensors=tensors))
    assert inventory.source == f"safetensors headers of {stored}, 1 file"


def test_a_trainers_own_pickles_are_not_pickle_weights(config_8b, tmp_path):
    """A config-only expert directory beside a Trainer's training_args.bin and optimizer.pt: the plan
    refused it as holding 'only pickle weights (training_args.bin)', as open_checkpoint says of a
    directory without weights; neither file holds weights. A pytorch_model.bin is still refused."""
    path_8b, _ = config_8b
    expert = tmp_path / "tuned"
    shutil.copytree(path_8b, expert)
    for name in ("training_args.bin", "optimizer.pt"):
        (expert / name).write_bytes(b"not read")
    experts = {**dict.fromkeys(EXPERTS_8B, str(path_8b)), EXPERTS_8B[1]: str(expert)}
    dry_run.read_inventory(recipe(str(path_8b), experts))
    with pytest.raises(UserError, match=r"has no model.safetensors or model.safetensors.index.json"):
        checkpoints.open_checkpoint(expert)
    (expert / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"holds only pickle weights \(pytorch_model.bin\)"):
        dry_run.read_inventory(recipe(str(path_8b), experts))


def test_a_config_only_expert_of_another_size_is_refused_as_the_fit_refuses_it(config_8b, config_70b):
    """Llama-3.1-70B's config.json as an expert of the 8B base: architecture and vocabulary agree,
    which was all the plan compared without weights, so it said the recipe fits; the fit refuses
    it at its first tensor. The shapes the two configs build are compared now, in the fit's words."""
    path_8b, _ = config_8b
    path_70b, _ = config_70b
    experts = {**dict.fromkeys(EXPERTS_8B, str(path_8b)), EXPERTS_8B[1]: str(path_70b)}
    with pytest.raises(UserError) as err:
        dry_run.read_inventory(recipe(str(path_8b), experts))
    assert str(err.value) == (
        "tensor model.embed_tokens.weight has shape [128256, 4096] vs [128256, 8192] "
        f"(base {path_8b} vs expert {EXPERTS_8B[1]!r} {path_70b}, as its config.json describes it)"
    )
    with pytest.raises(UserError, match=rf"vs expert {EXPERTS_8B[0]!r} {path_8b}, as its config.json"):
        dry_run.read_inventory(recipe(str(path_70b), dict.fromkeys(EXPERTS_8B, str(path_8b))))


@pytest.mark.parametrize(
    "extra, gib, enough",
    [
        ([], 40, 1),
        (["model.stack_dtype=float32", "model.exclude=[]", "optim.activation_checkpointing=false"], 80, 2),
    ],
)
def test_the_verdict_says_how_few_of_its_suggestions_fit_together(config_8b, extra, gib, enough):
    """int8 alone makes 8B with four experts fit a 40 GB card, and the list went on to a halved
    max_length and batch, 'all of them' fitting too: a user applying all of them changes what is
    fitted for no memory. The verdict says how many of the first suggestions fit, re-planned."""
    path, _ = config_8b
    overrides = [f"model.base={path}", *(f"model.experts.{e}={path}" for e in EXPERTS_8B), *extra]
    r = load_recipe(REPO / "recipes" / "8b.yaml", overrides)
    inventory, dims = dry_run.read_inventory(r)
    card = DeviceMemory("cuda:0", "a card", gib * 2**30, (gib - 1) * 2**30)
    short = plan.plan_memory(r, inventory, dims, card)
    assert len(short.suggestions) > enough and short.enough == enough

    def fits(n):
        firsts = [arg for override, _ in short.suggestions[:n] for arg in override.split(" ")]
        changed = load_recipe(REPO / "recipes" / "8b.yaml", [*overrides, *firsts])
        return plan.plan_memory(changed, inventory, dims, card).fits

    assert fits(enough) and not fits(enough - 1)
    said = "(so does the first alone)" if enough == 1 else f"(so do the first {enough})"
    assert f" GiB, fits {said}\n" in plan_table.verdict(short)


CUSTOM_CODE = {
    "configuration_x.py": "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n"
    "    model_type = 'xllama'\n",
    "modeling_x.py": "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
    "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n",
}


def test_a_config_only_expert_of_custom_code_is_built_by_the_bases_classes(tmp_path, monkeypatch):
    """A base of custom code (auto_map, trust_remote_code) and an expert given by its config.json
    alone, which differs from the base's in a key that builds nothing (_name_or_path): the expert's
    own architecture was built, from code its directory does not hold, and the plan refused it
    ('cannot build the architecture on the meta device') though the fit never reads an expert's
    code. Built by the base's classes, it passes; one of another size is still refused."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    small = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    fields = {**LlamaConfig(**small).to_dict(), "model_type": "xllama", "architectures": ["XForCausalLM"]}
    fields["auto_map"] = {
        "AutoConfig": "configuration_x.XConfig",
        "AutoModelForCausalLM": "modeling_x.XForCausalLM",
    }
    base, expert, wider = tmp_path / "base", tmp_path / "expert", tmp_path / "wider"
    for path, extra in (
        (base, {}),
        (expert, {"_name_or_path": "org/tuned"}),
        (wider, {"intermediate_size": 96}),
    ):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**fields, **extra}))
    for name, code in CUSTOM_CODE.items():
        (base / name).write_text(code)
    dry_run.read_inventory(recipe(str(base), {"a": str(base), "b": str(expert)}, trust_remote_code=True))
    with pytest.raises(UserError, match=r"has shape \[64, 32\] vs \[96, 32\] .*expert 'b' .*its config.json"):
        dry_run.read_inventory(recipe(str(base), {"a": str(base), "b": str(wider)}, trust_remote_code=True))
