"""The stack sharded over ranks (gloo, CPU processes) against one process holding all of it.

Each rank keeps a block of rows of every stacked matrix, scores its share of the batch, and the
ranks add up the loss and the K-vector gradient as a torchrun fit does. Loss and ∂L/∂z must equal
the single-process per-layer path to float32 rounding (1e-6), over architectures (tied
embeddings, Conv1D), int8 stacks, activation checkpointing, no-grad evaluation, and a world size
that does not divide the rows (padded blocks); each rank must hold 1/N of the stacked matrices.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch.nn.utils import parametrize

from mergeopt.memory import checkpointing
from mergeopt.merging.sharded_merge import (
    TRAFFIC,
    ShardedMergedParameter,
    reset_traffic,
    shard_rows,
    shard_stack,
)
from mergeopt.merging.stacking import build_stack
from mergeopt.objectives.loss import dev_loss
from tests.conftest import fork_ranks, free_port
from tests.test_layer_merge import padded_batch, perturbed_experts, tiny_model

LOGITS = torch.tensor([0.3, -0.4, 0.2], dtype=torch.float64)
SET_WEIGHTS = torch.tensor([1.0, 2.0])


def _problem(arch: str, dtype: torch.dtype):
    base = tiny_model(arch)
    stack = build_stack(base, perturbed_experts(base), dtype=dtype, progress=False)
    return base, stack


def _share(batch, rank: int, size: int):
    pick = slice(rank, None, size)
    return type(batch)(
        input_ids=batch.input_ids[pick],
        attention_mask=batch.attention_mask[pick],
        scored=batch.scored[pick],
        set_index=batch.set_index[pick],
    )


def _step(model, stack, batch, checkpointed: bool):
    (checkpointing.enable if checkpointed else checkpointing.disable)(model)
    z = LOGITS.clone().requires_grad_(True)
    loss = dev_loss(model, stack, z, batch, SET_WEIGHTS, 5)
    loss.backward()
    return loss.detach(), z.grad


def _worker(rank: int, size: int, port: int, arch: str, dtype: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        model, stack = _problem(arch, getattr(torch, dtype))
        whole = stack.nbytes()
        shard_stack(model, stack)
        results = {"whole_bytes": whole, "rank_bytes": stack.nbytes()}
        batch = _share(padded_batch(), rank, size)
        for checkpointed in (False, True):
            reset_traffic()
            loss, grad = _step(model, stack, batch, checkpointed)
            results[f"traffic {checkpointed}"] = dict(TRAFFIC)
            dist.all_reduce(loss)
            dist.all_reduce(grad)
            results[str(checkpointed)] = {"loss": float(loss), "grad": grad.tolist()}
        with torch.no_grad():  # evaluation: no autograd, the merged rows gathered all the same
            loss = dev_loss(model, stack, LOGITS.clone(), batch, SET_WEIGHTS, 5)
            dist.all_reduce(loss)
            results["evaluation"] = float(loss)
        gathered = [None] * size
        dist.all_gather_object(gathered, results)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "arch,dtype,size",
    # Llama is covered end to end by tests/test_distributed.py
    # Mixtral over 3 ranks: fused (experts, out, in) weights of 4 experts in blocks of 2, 2 and 0
    # (padded), with int8 scales per (expert, output channel)
    [("gemma2", "int8", 2), ("gpt2", "float32", 3), ("mixtral", "int8", 3)],
    ids=["gemma2-int8-2", "gpt2-3", "mixtral-int8-3"],
)
def test_sharded_ranks_give_the_single_process_loss_and_gradient(arch, dtype, size, tmp_path):
    model, stack = _problem(arch, getattr(torch, dtype))
    batch = padded_batch()
    want = {str(c): _step(model, stack, batch, c) for c in (False, True)}
    out = tmp_path / "ranks.json"
    fork_ranks(_worker, args=(size, free_port(), arch, dtype, str(out)), nprocs=size)
    ranks = json.loads(out.read_text())
    for checkpointed, (loss, grad) in want.items():
        for r in ranks:
            got = r[checkpointed]
            assert got["loss"] == pytest.approx(float(loss), rel=1e-6), checkpointed
            torch.testing.assert_close(
                torch.tensor(got["grad"], dtype=torch.float64), grad, rtol=1e-5, atol=1e-9
            )
        assert r["evaluation"] == pytest.approx(float(want["False"][0]), rel=1e-6)
    # a step's traffic against its minimum: each merged matrix crosses once per use in the forward
    # and, where autograd needs the weight (not an embedding lookup), once more in the backward
    # (merged weights are not kept between them: that would be a merged copy of the model); its
    # gradient is reduce-scattered once per use. Padded blocks included
    from torch.nn.utils import parametrize

    uses, lookups = {}, {}  # modules reading each merged parameter (a tied embedding: two)
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                uses[plist[0].name] = uses.get(plist[0].name, 0) + 1
                if isinstance(module, torch.nn.Embedding):  # its backward needs no weight
                    lookups[plist[0].name] = lookups.get(plist[0].name, 0) + 1
    once = again = 0
    for name, anchor in stack.anchor.items():
        if anchor.dim() >= 2:
            padded = -(-anchor.shape[0] // size) * size * anchor[0].numel() * 4  # float32 compute
            once += padded * uses[name]
            again += padded * (uses[name] - lookups.get(name, 0))
    for r in ranks:
        for checkpointed in ("False", "True"):
            traffic = r[f"traffic {checkpointed}"]
            assert traffic["reduce_scattered"] == once
            # every weight the backward needs is gathered again, never kept from the forward (that
            # would hold a merged copy of the model until the backward); a tied embedding may be
            # gathered once more (2.0 merged copies for Gemma2)
            assert once + again <= traffic["gathered"] <= 2 * once, checkpointed
    expected = 0  # each matrix's block of ⌈rows / N⌉ rows (anchor, differences, scales); vectors whole
    for name, anchor in stack.anchor.items():
        tensors = [anchor, stack.deltas[name], *([stack.scales[name]] if name in stack.scales else [])]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        rows = anchor.shape[0]
        expected += nbytes * -(-rows // size) // rows if anchor.dim() >= 2 else nbytes
    for r in ranks:
        assert r["whole_bytes"] == stack.nbytes()
        assert r["rank_bytes"] == expected
    # within 1.3x of an even share; 1.5x where fused experts split 2, 2, 0 over 3 ranks
    assert expected < stack.nbytes() / size * (1.5 if arch == "mixtral" else 1.3)


def test_shard_rows_pads_the_last_block():
    t = torch.arange(10.0).reshape(5, 2)
    blocks = [shard_rows(t, r, 3) for r in range(3)]
    assert [b.shape[0] for b in blocks] == [2, 2, 2]
    torch.testing.assert_close(torch.cat(blocks)[:5], t)
    assert torch.cat(blocks)[5:].abs().sum() == 0
    assert ShardedMergedParameter  # exported


def _recording_reads() -> list:
    """Record every read from a safetensors checkpoint in this process, as (directory name,
    tensor, start, stop); start and stop are None for a whole tensor."""
    from mergeopt.loading.checkpoints import Checkpoint

    reads = []
    whole_read, rows_read = Checkpoint.read, Checkpoint.read_rows

    def read(self, name, device="cpu"):
        reads.append((self.path.name, name, None, None))
        return whole_read(self, name, device)

    def read_rows(self, name, start, stop):
        reads.append((self.path.name, name, start, stop))
        return rows_read(self, name, start, stop)

    Checkpoint.read, Checkpoint.read_rows = read, read_rows
    return reads


def _stacking_worker(rank: int, size: int, port: int, root: str, dtype: str, out: str) -> None:
    """Stack from checkpoints twice: whole then sharded, and each rank reading only its rows."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from mergeopt.loading.checkpoints import open_checkpoint, under_model_names

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        root = Path(root)
        reads = _recording_reads()
        names = AutoModelForCausalLM.from_pretrained(root / "base")  # the model's names (fused experts)
        experts = {n: under_model_names(open_checkpoint(root / n), names) for n in ("a", "b", "c")}
        stacks = {}
        for how in ("whole", "while stacking"):
            reads.clear()
            model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
            shard = (rank, size) if how == "while stacking" else None
            stack = build_stack(model, experts, ("norm",), getattr(torch, dtype), False, shard=shard)
            if how == "whole":
                shard_stack(model, stack)
            stacks[how] = (stack, [read[1:] for read in reads])  # (tensor, start, stop)
        (whole, _), (sharded, sharded_reads) = stacks["whole"], stacks["while stacking"]
        same = all(
            torch.equal(whole.anchor[n], sharded.anchor[n])
            and torch.equal(whole.deltas[n], sharded.deltas[n])
            for n in whole.anchor
        ) and all(torch.equal(whole.scales[n], sharded.scales[n]) for n in whole.scales)
        gathered = [None] * size
        shapes = {n: list(t.shape) for n, t in experts["a"].tensors.items()}
        dist.all_gather_object(gathered, {"same": same, "reads": sharded_reads, "shapes": shapes})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "arch,dtype,size",
    # padded blocks and per-row scales; Mixtral's 4 experts over 3 ranks: blocks of 2, 2 and 0
    # experts of each fused weight, read from those experts' own tensors of the checkpoint
    [("llama", "int8", 3), ("mixtral", "int8", 3)],
)
def test_each_rank_reads_only_its_rows_of_every_matrix(tmp_path, arch, dtype, size):
    """Stacking while sharded gives each rank exactly the block sharding a whole stack gives it,
    and it reads from each expert's safetensors only that block of each matrix (of a fused
    mixture-of-experts weight, only the tensors of the experts in its block)."""
    import re

    from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from tests.conftest import TINY_SHAPES, perturbed, save_checkpoint, tiny_config

    torch.manual_seed(0)
    if arch == "mixtral":
        base = MixtralForCausalLM(MixtralConfig(**TINY_SHAPES, num_local_experts=4)).eval()
    else:
        base = LlamaForCausalLM(tiny_config()).eval()
    save_checkpoint(base, tmp_path / "base")
    for i, name in enumerate("abc"):
        save_checkpoint(perturbed(base, 100 + i), tmp_path / name)
    out = tmp_path / "ranks.json"
    fork_ranks(_stacking_worker, args=(size, free_port(), str(tmp_path), dtype, str(out)), nprocs=size)
    ranks = json.loads(out.read_text())
    assert all(r["same"] for r in ranks)
    for rank, r in enumerate(ranks):
        for name, start, stop in r["reads"]:
            if name not in r["shapes"]:  # a stored tensor of a converted one
                assert start is None or "block_sparse_moe.gate" in name, name  # renamed: its rows
                if start is not None:
                    continue
                expert = int(re.search(r"\.experts\.(\d+)\.", name).group(1))  # read whole
                assert rank * 2 <= expert < rank * 2 + 2, (rank, name)  # ⌈4/3⌉ = 2 experts a rank
                continue
            shape = r["shapes"][name]
            assert len(shape) < 2 or start is not None, f"rank {rank} read all of {name}"
            if start is not None:
                per = -(-shape[0] // size)
                assert (start, stop) == (min(rank * per, shape[0]), min((rank + 1) * per, shape[0]))
        matrices = {n for n, s in r["shapes"].items() if len(s) >= 2 and "norm" not in n}
        assert {n for n, start, _ in r["reads"] if start is not None and n in r["shapes"]} == matrices


def _loading_worker(rank: int, size: int, port: int, root: str, method: str, out: str) -> None:
    """Load as a sharded fit does (the architecture empty, θ0 and every expert read by rows),
    score this rank's share of a batch, and record every read from the safetensors."""
    from pathlib import Path

    from transformers import AutoConfig

    from mergeopt.config import MergeSection
    from mergeopt.loading.checkpoints import open_checkpoint
    from mergeopt.loading.sharded_load import CheckpointBase, empty_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        root = Path(root)
        reads = _recording_reads()
        experts = {n: open_checkpoint(root / n) for n in ("a", "b", "c")}
        model = empty_model(AutoConfig.from_pretrained(root / "base"), torch.float32, torch.device("cpu"))
        stack = build_stack(
            model,
            experts,
            EXCLUDED,
            torch.float32,
            False,
            merge=MergeSection(method=method),
            seed=3,
            shard=(rank, size),
            base=CheckpointBase(open_checkpoint(root / "base")),
            device=torch.device("cpu"),
        )
        held = {}  # every parameter's tensor on this rank: a block of rows (parametrized) or whole
        for name, module in model.named_modules():
            if isinstance(module, parametrize.ParametrizationList):
                continue
            for attr, param in module._parameters.items():
                if param is not None:
                    held[f"{name}.{attr}"] = list(param.shape)
            if parametrize.is_parametrized(module):
                for attr, plist in module.parametrizations.items():
                    held[f"{name}.{attr}"] = list(plist.original.shape)
        loss, grad = _step(model, stack, _share(padded_batch(), rank, size), True)
        dist.all_reduce(loss)
        dist.all_reduce(grad)
        result = {"loss": float(loss), "grad": grad.tolist(), "reads": reads, "held": held}
        gathered = [None] * size
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


EXCLUDED = ("norm", "embed_tokens")  # vectors, and one matrix kept at θ0 (sharded all the same)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_sharded_load_reads_rows_of_the_base_and_of_every_expert(tmp_path, method):
    """No rank loads θ0 or an expert whole: every matrix is read as the rank's rows (from the
    base too) and kept as a block of them, merged or not; loss and gradient equal the whole load's.
    TIES prepares each tensor whole (one at a time, from whole reads) and keeps its block."""
    from transformers import LlamaForCausalLM

    from mergeopt.config import MergeSection
    from mergeopt.loading.checkpoints import open_checkpoint
    from tests.conftest import perturbed, save_checkpoint, tiny_config

    size = 3
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(vocab_size=61)).eval()
    save_checkpoint(base, tmp_path / "base")
    for i, name in enumerate("abc"):
        save_checkpoint(perturbed(base, 100 + i), tmp_path / name)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    experts = {n: open_checkpoint(tmp_path / n) for n in "abc"}
    stack = build_stack(
        model, experts, EXCLUDED, torch.float32, False, merge=MergeSection(method=method), seed=3
    )
    loss, grad = _step(model, stack, padded_batch(), True)
    out = tmp_path / "ranks.json"
    fork_ranks(_loading_worker, args=(size, free_port(), str(tmp_path), method, str(out)), nprocs=size)
    ranks = json.loads(out.read_text())
    shapes = {n: list(p.shape) for n, p in base.named_parameters()}
    matrices = {n for n, s in shapes.items() if len(s) >= 2}
    for rank, r in enumerate(ranks):
        assert r["loss"] == pytest.approx(float(loss), rel=1e-6)
        torch.testing.assert_close(torch.tensor(r["grad"], dtype=torch.float64), grad, rtol=1e-5, atol=1e-9)
        for name, shape in shapes.items():
            per = -(-shape[0] // size)
            assert r["held"][name] == ([per, *shape[1:]] if name in matrices else shape), name
        for ckpt, name, start, stop in r["reads"]:
            shape = shapes[name]
            if method == "ties" and ckpt != "base" and name in matrices and "embed_tokens" not in name:
                continue  # TIES trims each whole task vector: read whole, one tensor at a time
            if method == "ties" and ckpt == "base" and name in matrices and "embed_tokens" not in name:
                continue
            assert len(shape) < 2 or start is not None, f"rank {rank} read all of {name} from {ckpt}"
            if start is not None:
                per = -(-shape[0] // size)
                assert (start, stop) == (min(rank * per, shape[0]), min((rank + 1) * per, shape[0]))
        if method == "linear":
            rows_read = {(c, n) for c, n, start, _ in r["reads"] if start is not None}
            assert rows_read == {("base", n) for n in matrices} | {
                (c, n) for c in "abc" for n in matrices if "embed_tokens" not in n
            }


def _lora_batch(vocab: int):
    batch = padded_batch()
    batch.input_ids.remainder_(vocab - 3).add_(3)  # that test's ids, this vocabulary
    return batch


def _lora_problem(root):
    """The base and LoRA experts of tests/test_lowrank.py (seeded), the experts read back from root
    (plain LoRA, or with dense updates: what they set densely is stacked in blocks of rows too)."""
    from transformers import LlamaForCausalLM

    from mergeopt.loading.lora import read_adapter
    from mergeopt.merging.mixed_experts import build_expert_stack
    from tests.conftest import tiny_config
    from tests.test_lowrank import NAMES

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    adapters = {n: read_adapter(root / n, shapes) for n in NAMES}
    return base, lambda model, shard=None: build_expert_stack(
        model, list(NAMES), {}, adapters, progress=False, shard=shard
    )


def _lora_worker(rank: int, size: int, port: int, root: str, out: str) -> None:
    from pathlib import Path

    from mergeopt.merging.sharded_merge import shard_lowrank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        model, build = _lora_problem(Path(root))
        stack = build(model, (rank, size))
        shard_lowrank(stack.lowrank, rank, size)
        rows = {n: [f.a.shape[0], f.b.shape[0]] for n, f in stack.lowrank.modules.items()}
        results = {"rows": rows, "bytes": stack.lowrank.nbytes()}
        batch = _share(_lora_batch(model.config.vocab_size), rank, size)
        for checkpointed in (False, True):
            loss, grad = _step(model, stack, batch, checkpointed)
            dist.all_reduce(loss)
            dist.all_reduce(grad)
            results[str(checkpointed)] = {"loss": float(loss), "grad": grad.tolist()}
        gathered = [None] * size
        dist.all_gather_object(gathered, results)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["lora", "dense-updates"])
def test_lora_factors_sharded_give_the_single_process_loss_and_gradient(tmp_path, kind):
    """LoRA experts kept low-rank under a sharded stack: each rank keeps ⌈rows/N⌉ rows of every
    A and B, the ranks gather them when their module runs; loss and ∂L/∂z equal one process's.
    ``dense-updates``: with DoRA (kept low-rank, its gains computed per block of rows and gathered:
    mergeopt.merging.dora), a saved lm_head and an adapted embedding (stacked densely)."""
    from tests.test_lowrank import DENSE_UPDATES, make_world

    make_world(tmp_path, DENSE_UPDATES if kind == "dense-updates" else None)  # saves the PEFT adapters
    model, build = _lora_problem(tmp_path)
    stack = build(model)
    assert bool(stack.deltas) == (kind == "dense-updates")  # lm_head, embedding: dense rows
    gains = {n for n, f in stack.lowrank.modules.items() if f.gain is not None}
    assert bool(gains) == (kind == "dense-updates")  # alpha's DoRA q, v and down
    want = {str(c): _step(model, stack, _lora_batch(model.config.vocab_size), c) for c in (False, True)}
    size = 3
    out = tmp_path / "ranks.json"
    fork_ranks(_lora_worker, args=(size, free_port(), str(tmp_path), str(out)), nprocs=size)
    ranks = json.loads(out.read_text())
    whole = {n: (f.a.shape[0], f.b.shape[0]) for n, f in stack.lowrank.modules.items()}
    for r in ranks:
        for checkpointed, (loss, grad) in want.items():
            assert r[checkpointed]["loss"] == pytest.approx(float(loss), rel=1e-6)
            torch.testing.assert_close(
                torch.tensor(r[checkpointed]["grad"], dtype=torch.float64), grad, rtol=1e-5, atol=1e-9
            )
        assert r["rows"] == {n: [-(-a // size), -(-b // size)] for n, (a, b) in whole.items()}
        assert r["bytes"] < stack.lowrank.nbytes() / size * 1.5


def test_the_one_process_gpu_check_runs_here_with_gloo(tmp_path):
    """benchmarks/sharded_check.py (the sharded path's check for a GPU session) on a tiny Llama on
    the CPU: the sharded load and step equal the whole path, and it writes its report."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, repo_pythonpath, tiny_config

    config = tmp_path / "tiny.json"
    tiny_config(vocab_size=61, max_position_embeddings=512).to_json_file(config)
    run = subprocess.run(
        [sys.executable, "benchmarks/sharded_check.py", "--device", "cpu"]
        + ["--config", f"random://{config}", "--out", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": repo_pythonpath()},  # this checkout's mergeopt, not an installed one
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "sharded_check-cpu.json").read_text())
    assert report["ok"] and report["backend"] == "gloo"
    assert report["loss_relative_difference"] <= 1e-5 and report["grad_relative_difference"] <= 1e-5
    assert 1.0 < report["sharded"]["gathered_over_one_merged_copy"] <= 2.0
