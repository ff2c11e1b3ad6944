"""The bad-input matrix: every row of docs/reference/bad-input.md is one test here.

Each row is a user's mistake fed to a real command (fit, merge, rank, calibrate, transfer, export, train, diagnose). The
command must exit with code 2, print exactly one line on stderr that names the culprit, write
nothing (the output path does not appear), and show a traceback only under ``--debug``. The
matrix and the documented table are checked to list the same rows.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergeopt import fit
from mergeopt.errors import run_cli
from mergeopt.evaluation import calibrate, diagnose, rank, transfer
from mergeopt.export import merge
from mergeopt.export.command import main as export_main
from mergeopt.worlds import train
from tests import malformed
from tests.conftest import (
    REPO,
    lm_eval_task_yaml,
    recipe_tree,
    run_module,
    streaming_without_torchvision,
    write_jsonl,
)

DOC = REPO / "docs" / "reference" / "bad-input.md"
MAINS = {
    "fit": fit.main,
    "merge": merge.main,
    "rank": rank.main,
    "calibrate": calibrate.main,
    "transfer": transfer.main,
    "export": export_main,
    "train": train.main,
    "diagnose": diagnose.main,
}


# ----------------------------------------------------------------------------- building bad inputs


def _recipe(world, tmp: Path, edit: Callable[[dict], None] | None = None, text: str | None = None) -> str:
    tree = recipe_tree(world, tmp / "out")
    if edit:
        edit(tree)
    path = tmp / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(tree))
    return str(path)


def _recipe_text(world, tmp: Path) -> str:
    """The recipe as YAML text, block style, for mistakes only the text can make."""
    return yaml.safe_dump(recipe_tree(world, tmp / "out"), default_flow_style=False, sort_keys=False)


def _expert_copy(world, tmp: Path, change: Callable[[dict], None], name: str = "bad") -> str:
    """A copy of expert alpha whose tensors ``change`` edits in place."""
    src = Path(world["experts"]["alpha"])
    dst = tmp / name
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


_TABLE = {"w_a": [1.0, 0.0, 0.5, 0.2], "w_b": [0.0, 1.0, 0.5, 0.8], "loss": [1.0, 2.0, 1.4, 1.9]}


def _checkpoint_then_changed_dev(world, tmp: Path) -> list[str]:
    """A fit's checkpoint in tmp/run, then one of the dev files it read edited."""
    from mergeopt.config import load_recipe
    from mergeopt.runtime.fingerprint import input_fingerprints
    from mergeopt.runtime.resume import RunState
    from mergeopt.runtime.resume import recipe_tree as resolved_tree

    dev = tmp / "arith.jsonl"
    shutil.copy(world["dev"]["arith"], dev)

    def edit(tree):
        tree["output_dir"] = str(tmp / "run")
        tree["data"]["dev"][0]["path"] = str(dev)

    path = _recipe(world, tmp, edit)
    recipe = load_recipe(path)
    RunState(tmp / "run", resolved_tree(recipe), inputs=input_fingerprints(recipe)).start()
    dev.write_text(dev.read_text() + '{"text": "1+1=2"}\n')
    return [path]


def _with_expert(world, tmp, path: str, extra: str = "") -> list[str]:
    return [_recipe(world, tmp), f"model.experts.alpha={path}", *([extra] if extra else [])]


def _output_into_an_expert(world, tmp) -> list[str]:
    """A fit whose output_dir is one of its experts' checkpoints (a copy: nothing of the shared world)."""
    expert = _expert_copy(world, tmp, lambda tensors: None, name="alpha-copy")
    return [_recipe(world, tmp), f"model.experts.alpha={expert}", f"output_dir={expert}"]


def _out_into_an_expert(world, tmp, *options: str) -> list[str]:
    """A command whose --out is one of its experts' checkpoints (a copy: nothing of the shared world).
    (``merge`` refuses it already: a non-empty --out, and with --overwrite one holding an input.)"""
    expert = _expert_copy(world, tmp, lambda tensors: None, name="alpha-copy")
    return [_recipe(world, tmp), f"model.experts.alpha={expert}", *options, "--out", expert]


def _nan(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")


def _reshape(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)


def _missing_shard(world, tmp):
    src = Path(world["experts"]["alpha"])
    dst = tmp / "sharded"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(dst / "model-00001-of-00002.safetensors"))
    weight_map = {
        n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
        for i, n in enumerate(names)
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return _with_expert(world, tmp, str(dst))


def _pickled(world, tmp):
    dst = tmp / "pickled"
    shutil.copytree(world["experts"]["alpha"], dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(tensors, dst / "pytorch_model.bin")
    return _with_expert(world, tmp, str(dst))


def _other_vocab(world, tmp):
    dst = tmp / "vocab"
    shutil.copytree(world["experts"]["alpha"], dst)
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += 1
    (dst / "config.json").write_text(json.dumps(config))
    return _with_expert(world, tmp, str(dst))


def _quantized(world, tmp):
    """Expert alpha as a quantized checkpoint: config.json's quantization_config and packed uint8
    blocks beside the weights (as GPT-OSS's published MXFP4 checkpoints hold its experts)."""
    dst = tmp / "quantized"
    shutil.copytree(world["experts"]["alpha"], dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight_blocks"] = torch.zeros(4, 2, dtype=torch.uint8)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return _with_expert(world, tmp, str(dst))


def _adapter(
    world, tmp, rename: tuple[str, str] | None = None, resized: bool = False, **config_changes
) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["base"])
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    dst = tmp / "adapter"
    peft_model.save_pretrained(dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = world["base"]
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if rename:  # factors for a module the base does not have
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    if resized:  # a saved lm_head for 8 added tokens (modules_to_save after resize_token_embeddings)
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        head = base.get_output_embeddings().weight
        tensors["base_model.model.lm_head.weight"] = torch.zeros(head.shape[0] + 8, head.shape[1])
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    return str(dst)


def _adapter_of_a_tied_head(world, tmp):
    """The base re-saved with its output layer tied to the embedding, and a LoRA on that layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(world["base"])
    config.tie_word_embeddings = True
    base = AutoModelForCausalLM.from_config(config)
    base.save_pretrained(tmp / "tied-base")
    shutil.copy(Path(world["base"]) / "tokenizer.json", tmp / "tied-base")
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    peft_model.save_pretrained(tmp / "adapter")
    return [*_with_expert(world, tmp, str(tmp / "adapter")), f"model.base={tmp / 'tied-base'}"]


def _adapter_other_base(world, tmp):
    """An adapter whose base_model_name_or_path is a local model other than the base: a fine-tune
    of the same architecture (a copy of the base would be accepted: tests/test_lora_experts.py)."""
    other = tmp / "other-base"
    shutil.copytree(world["experts"]["alpha"], other)
    return _with_expert(world, tmp, _adapter(world, tmp, base_model_name_or_path=str(other)))


def _trainer_output_without_final_save(world, tmp):
    """TRL's output directory as a run killed before its final save leaves it: the adapter only in
    its checkpoint-N subdirectories (the latest by number: checkpoint-12, not checkpoint-4)."""
    out = tmp / "trl-out"
    for step in (4, 12):
        shutil.copytree(_adapter(world, tmp / f"s{step}"), out / f"checkpoint-{step}")
    return _with_expert(world, tmp, str(out))


def _adapter_beside_a_model(world, tmp):
    """An adapter directory that also holds a full model's weights (a merged model saved into it)."""
    adapter = _adapter(world, tmp)
    shutil.copy(Path(world["experts"]["alpha"]) / "model.safetensors", adapter)
    return _with_expert(world, tmp, adapter)


def _adapter_other_hub_base(world, tmp):
    """An adapter naming hub repository acme/base-Instruct, and a base that is a snapshot of
    acme/base in the Hugging Face cache."""
    snapshot = tmp / "hub" / "models--acme--base" / "snapshots" / "0123abcd"
    shutil.copytree(world["base"], snapshot)
    adapter = _adapter(world, tmp, base_model_name_or_path="acme/base-Instruct")
    return [*_with_expert(world, tmp, adapter), f"model.base={snapshot}"]


def _base_without_tokenizer(world, tmp):
    base = tmp / "base-without-tokenizer"
    shutil.copytree(world["base"], base, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja", "vocab.json"))
    return [_recipe(world, tmp), f"model.base={base}"]


def _empty_dir(path: Path) -> str:
    path.mkdir()
    return str(path)


def _dev(world, tmp, lines: str | None, records=None) -> list[str]:
    path = tmp / "dev.jsonl"
    if records is not None:
        write_jsonl(path, records)
    elif lines is not None:
        path.write_text(lines)

    def edit(tree):
        tree["data"]["dev"][0]["path"] = str(path)

    return [_recipe(world, tmp, edit)]


_QA = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]


def _chat_dev(world, tmp, template: str, record: dict | None = None) -> list[str]:
    """A conversational dev set (four copies of ``record``, by default a question and its answer)
    rendered by ``template`` (data.chat_template)."""
    (tmp / "chat.jinja").write_text(template)
    argv = _dev(world, tmp, None, [record or {"messages": _QA}] * 4)
    tree = yaml.safe_load(Path(argv[0]).read_text())
    tree["data"]["chat_template"] = str(tmp / "chat.jinja")
    Path(argv[0]).write_text(yaml.safe_dump(tree))
    return argv


def _lm_eval_task(world, tmp, task: str, yaml_text: str) -> list[str]:
    """A recipe whose one objective term is the local lm-eval task ``task``, written from ``yaml_text``."""
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / f"{task}.yaml").write_text(f"task: {task}\n{yaml_text}")

    def edit(tree):
        term = {"kind": "lm_eval", "task": task, "include_path": str(tmp / "tasks")}
        tree["objective"] = {"terms": [term]}
        tree["search"] = {"strategy": "grid"}

    return [_recipe(world, tmp, edit)]


def _test_split_task(world, tmp) -> list[str]:
    """A recipe whose lm_eval term's local task is scored on its test split (the YAML alone is read)."""
    return _lm_eval_task(
        world,
        tmp,
        "gsm8k_local",
        "dataset_path: json\ndataset_kwargs: {data_files: {test: gsm8k.jsonl}}\n"
        "test_split: test\noutput_type: loglikelihood\n",
    )


def _task_without_data(world, tmp) -> list[str]:
    """A recipe whose lm_eval term's local task reads a data file that is not there."""
    return _lm_eval_task(
        world,
        tmp,
        "arith_local",
        f"dataset_path: json\ndataset_kwargs: {{data_files: {{validation: {tmp / 'gone' / 'arith.jsonl'}}}}}\n"
        "validation_split: validation\noutput_type: loglikelihood\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{completion}}'\n",
    )


def _perplexity_maximised(world, tmp) -> list[str]:
    """A recipe whose lm_eval term keeps the default higher_is_better on a task that declares its
    metric, perplexity, better lower."""
    (tmp / "tasks").mkdir()
    data = {"validation": Path(world["dev"]["arith"])}
    (tmp / "tasks" / "arith_ppl.yaml").write_text(lm_eval_task_yaml("arith_ppl", data, "perplexity"))

    def edit(tree):
        term = {"kind": "lm_eval", "task": "arith_ppl", "include_path": str(tmp / "tasks")}
        tree["objective"] = {"terms": [{**term, "metric": "perplexity"}]}
        tree["search"] = {"strategy": "grid"}

    return [_recipe(world, tmp, edit)]


def _finished_run(world, tmp, change: Callable[[dict], None] | None = None) -> Path:
    """A mixture.json as fit writes it (weights over the world's experts), edited by ``change``."""
    run = tmp / "run"
    run.mkdir()
    mixture = {
        "status": "complete",
        "weights": {"alpha": 0.5, "beta": 0.3, "gamma": 0.2},
        "method": {"name": "linear", "scale": 1.0},
        "seed": 0,
        "strategy": "gradient",
    }
    if change:
        change(mixture)
    (run / "mixture.json").write_text(json.dumps(mixture))
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_tree(world, run)))
    return run


def _recorded(upper: dict | None = None, max_epochs: float | None = None) -> dict:
    """mixture.json's constraints for the weights _finished_run writes (alpha 0.5, beta 0.3, gamma 0.2)."""
    names = ("alpha", "beta", "gamma")
    record = {
        "lower": dict.fromkeys(names, 0.0),
        "upper": {**dict.fromkeys(names, 1.0), **(upper or {})},
        "upper_from": {n: "bound" if n in (upper or {}) else "" for n in names},
        "bounds": {n: [0.0, hi] for n, hi in (upper or {}).items()},
        "pinned": {},
    }
    if max_epochs is not None:
        record.update(max_epochs=max_epochs, token_budget=2000, tokens=dict.fromkeys(names, 1000))
    return record


def _grid(world, tmp, change: Callable[[list[dict]], None]) -> list[str]:
    rows = [
        {"w_alpha": 1.0, "w_beta": 0.0, "w_gamma": 0.0, "loss_arith": 3.0, "loss_markov": 3.1},
        {"w_alpha": 0.0, "w_beta": 1.0, "w_gamma": 0.0, "loss_arith": 3.2, "loss_markov": 3.0},
        {"w_alpha": 0.0, "w_beta": 0.0, "w_gamma": 1.0, "loss_arith": 3.1, "loss_markov": 3.3},
    ]
    change(rows)
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp / "grid.csv", index=False)
    return [_recipe(world, tmp), "--grid", str(tmp / "grid.csv")]


def _grid_measured_on_fewer_records(world, tmp) -> list[str]:
    """A grid whose mergeopt train read 5 records of dev set arith (data.max_examples: 5), ranked
    by a recipe that reads all 20."""
    from mergeopt.runtime.fingerprint import digest
    from mergeopt.worlds.grid_measures import KIND, VERSION, measured_path

    args = _grid(world, tmp, lambda rows: None)
    path = world["dev"]["arith"]
    arith = {"path": path, "digest": digest(path), "max_examples": 5, "records": 5, "max_length": 48}
    measures = {"kind": KIND, "version": VERSION, "columns": {"loss_arith": {"dev_set": arith}}}
    measured_path(tmp / "grid.csv").write_text(json.dumps(measures))
    return args


def _no_run_grid_without_proxy(world, tmp) -> list[str]:
    """A grid of only its header line, and a recipe whose calibration leaves the proxy out."""
    (tmp / "grid.csv").write_text("w_alpha,w_beta,w_gamma,loss_arith,loss_markov\n")
    recipe = _recipe(world, tmp, lambda tree: tree.update(calibrate={"use_proxy": False}))
    return [recipe, "--grid", str(tmp / "grid.csv")]


def _semicolon_grid(world, tmp) -> list[str]:
    """A grid of runs saved by a spreadsheet that separates cells by semicolons (decimal commas)."""
    args = _grid(world, tmp, lambda rows: None)
    (tmp / "grid.csv").write_text(
        "w_alpha;w_beta;w_gamma;loss_arith;loss_markov\n1;0;0;3,0;3,1\n0;1;0;3,2;3,0\n0;0;1;3,1;3,3\n"
    )
    return args


def _calibration_grid(
    world, tmp, edit=None, run_fingerprint: str | None = None, grid_paths: list[str] | None = None
) -> list[str]:
    """A grid of three runs for ``mergeopt calibrate``; with ``run_fingerprint``, the recipe's
    experts and the grid's runs each carry a ``mergeopt train`` run.json, with other fingerprints;
    with ``grid_paths``, the rows' path column."""
    args = _grid(world, tmp, lambda rows: [r.update(path=p) for r, p in zip(rows, grid_paths or [])])
    experts = dict(world["experts"])
    if run_fingerprint is not None:
        for name, path in world["experts"].items():
            experts[name] = str(shutil.copytree(path, tmp / "experts" / name))
            (tmp / "experts" / name / "run.json").write_text(json.dumps({"fingerprint": "0123abcd"}))
        run = tmp / "runs" / "mixtures" / "001"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"fingerprint": run_fingerprint}))
        import pandas as pd

        table = pd.read_csv(tmp / "grid.csv")
        table.insert(0, "path", str(run))
        table.to_csv(tmp / "grid.csv", index=False)

    def change(tree):
        tree["model"]["experts"] = experts
        (edit or (lambda _: None))(tree)

    return [_recipe(world, tmp, change), *args[1:]]


def _grid_naming_one_checkpoint_twice(world, tmp) -> list[str]:
    """Rows 1 and 3 name one run trained elsewhere (a directory without mergeopt train's run.json),
    the second time through a path relative to the grid."""
    runs = [tmp / "runs" / "a", tmp / "runs" / "b"]
    for run in runs:
        run.mkdir(parents=True)
    paths = [str(runs[0]), str(runs[1]), "runs/a"]
    return _calibration_grid(world, tmp, lambda _tree: None, grid_paths=paths)


def _export_to(world, tmp, fmt: str, paths: dict[str, str], change=None) -> list[str]:
    """``mergeopt export`` of _finished_run's mixture to ``fmt`` with one dataset per expert."""
    run = _finished_run(world, tmp, change)
    return [
        str(run),
        "--to",
        fmt,
        "--datasets",
        *(f"{n}={p}" for n, p in paths.items()),
        "--out",
        str(tmp / "out"),
    ]


def _broken_jsonl(tmp) -> str:
    """A dataset whose line 3 is not JSON (the datasets library's log calls it row 2)."""
    path = tmp / "broken.jsonl"
    good = json.dumps({"prompt": "1+1=", "completion": "2"})
    path.write_text(f'{good}\n{good}\n{{"prompt": "2+2=", "completion" "4"}}\n{good}\n')
    return str(path)


def _np_save_file(tmp) -> str:
    path = tmp / "tokens.npy"
    np.save(path, np.arange(100, dtype=np.uint16))  # a header OLMo-core would read as tokens
    return str(path)


def _lonely_bin(tmp) -> str:
    path = tmp / "tokens.bin"
    path.write_bytes(bytes(16))  # a Megatron .bin without its tokens.idx
    return str(path)


def _corrupt_mds(tmp) -> str:
    path = _mkdir(tmp / "mds")
    (path / "index.json").write_text('{"version": 2, "shards": ')  # cut short
    return str(path)


def _corrupt_zstd_mds(tmp, name: str) -> str:
    """An MDS directory whose one shard is only compressed (as ``MDSWriter(compression="zstd")``
    leaves it), and not zstd data at all."""
    path = _mkdir(tmp / name)
    files = {"raw_data": ("shard.00000.mds", 100), "zip_data": ("shard.00000.mds.zstd", 9)}
    shard = {
        "column_encodings": ["str"],
        "column_names": ["text"],
        "column_sizes": [None],
        "compression": "zstd",
        "format": "mds",
        "hashes": [],
        "samples": 1,
        "size_limit": 1 << 26,
        "version": 2,
        **{key: {"basename": base, "bytes": size, "hashes": {}} for key, (base, size) in files.items()},
    }
    (path / "index.json").write_text(json.dumps({"version": 2, "shards": [shard]}))
    (path / "shard.00000.mds.zstd").write_bytes(b"not zstd!")
    return str(path)


def _split_root(tmp, name: str) -> str:
    """llm-foundry's convert-script layout, ROOT/train and ROOT/val, each with an index.json."""
    for split in ("train", "val"):
        (tmp / name / split).mkdir(parents=True)
        (tmp / name / split / "index.json").write_text('{"version": 2, "shards": []}')
    return str(tmp / name)


def _empty_tokens(tmp) -> str:
    path = tmp / "empty.npy"
    path.write_bytes(b"")
    return str(path)


def _multiple_choice(tmp) -> str:
    path = tmp / "choice.jsonl"
    write_jsonl(path, [{"prompt": "2+2=", "choices": ["3", "4"], "answer": 1}] * 4)
    return str(path)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _rank_tables(tmp, proxy: dict, truth: dict, *extra: str) -> list[str]:
    """``mergeopt rank`` in table mode on two small CSVs."""
    import pandas as pd

    pd.DataFrame(proxy).to_csv(tmp / "proxy.csv", index=False)
    pd.DataFrame(truth).to_csv(tmp / "truth.csv", index=False)
    return [
        "--proxy",
        str(tmp / "proxy.csv"),
        "--truth",
        str(tmp / "truth.csv"),
        *extra,
        "--out",
        str(tmp / "out"),
    ]


RANK_TABLE = {"run": [0, 1, 2], "w_a": [1.0, 0.5, 0.0], "w_b": [0.0, 0.5, 1.0], "loss": [1.0, 2.0, 3.0]}


def _semicolon_proxy(tmp) -> list[str]:
    """A proxy table saved by a spreadsheet that separates cells by semicolons (decimal commas)."""
    args = _rank_tables(tmp, RANK_TABLE, RANK_TABLE)
    (tmp / "proxy.csv").write_text("w_a;w_b;loss\n0,5;0,5;1,5\n1;0;2,5\n0;1;3\n")
    return args


def _rank_tables_text(tmp, proxy_text: str) -> list[str]:
    """Table mode with RANK_TABLE as the truth and ``proxy_text`` as the proxy table, written as is."""
    args = _rank_tables(tmp, RANK_TABLE, RANK_TABLE)
    (tmp / "proxy.csv").write_text(proxy_text)
    return args


def _two_tables(tmp, small: dict, large: dict) -> list[str]:
    import pandas as pd

    pd.DataFrame(small).to_csv(tmp / "small.csv", index=False)
    pd.DataFrame(large).to_csv(tmp / "large.csv", index=False)
    return [str(tmp / "small.csv"), str(tmp / "large.csv"), "--out", str(tmp / "out")]


def _train_recipe(world, tmp, edit) -> list[str]:
    def change(tree):
        data = {n: world["dev"]["arith"] for n in ("alpha", "beta", "gamma")}
        tree["train"] = {
            "data": data,
            "output_dir": str(tmp / "out"),
            "steps": 2,
            "batch_tokens": 64,
            "max_length": 48,  # the random world's base has 64 positions
        }
        tree["model"]["experts"] = {n: str(tmp / "out" / n) for n in ("alpha", "beta", "gamma")}
        edit(tree)

    return [_recipe(world, tmp, change)]


def _damaged_json(tmp) -> str:
    path = tmp / "damaged.json"
    path.write_text('{"status": "complete", "weights": {"alpha": 0.5,')
    return str(path)


def _merge_to(world, tmp: Path, out: str) -> list[str]:
    return [_recipe(world, tmp), "--weights", "alpha=0.5,beta=0.3,gamma=0.2", "--out", out]


def _swap_alpha_and_beta(tree: dict) -> None:
    """Two experts' checkpoints swapped under their names: the weights fitted for one go to the other."""
    experts = tree["model"]["experts"]
    experts["alpha"], experts["beta"] = experts["beta"], experts["alpha"]


def _del(tree, *keys):
    for k in keys[:-1]:
        tree = tree[k]
    del tree[keys[-1]]


# id -> (input kind, command, argv builder (world, tmp) -> argv, culprit in the message)
MATRIX: dict[str, tuple[str, str, Callable, str]] = {
    # recipes
    "recipe file missing": ("recipe", "fit", lambda w, t: [str(t / "nope.yaml")], "nope.yaml does not exist"),
    "recipe not valid YAML": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t, text="model: [base\n")],
        "recipe.yaml:2",
    ),
    "unknown recipe key": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "optim.lrr=0.1"],
        "optim.lrr: unknown key",
    ),
    "wrong type": ("recipe", "fit", lambda w, t: [_recipe(w, t), "optim.steps=many"], "optim.steps"),
    "W&B project name that W&B refuses": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "logging.backends=[wandb]", "logging.project=team/mixtures"],
        "logging.project: 'team/mixtures' is not a W&B project name: it contains /",
    ),
    "empty tracking project": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "logging.backends=[mlflow]", "logging.project="],
        "logging.project: is empty",
    ),
    "duplicate key": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t, text="seed: 0\nseed: 1\n")],
        "duplicate key 'seed'",
    ),
    "missing required key": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tr: _del(tr, "model", "base"))],
        "model.base",
    ),
    "expert named no, unquoted": (
        "recipe",
        "fit",
        lambda w, t: [
            _recipe(
                w, t, text=_recipe_text(w, t).replace("\n  experts:\n    alpha:", "\n  experts:\n    no:")
            )
        ],
        "model.experts: has a key that is the boolean false, not a string: YAML reads an unquoted no",
    ),
    "dev set named off, unquoted": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "data.dev.0.name=off"],
        "data.dev.0.name: is the boolean false, not a string",
    ),
    "seed given as yes, unquoted": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tr: tr.update(seed=True))],
        "seed: true is not a number (YAML reads unquoted true/false, yes/no and on/off as booleans)",
    ),
    "mixture weight given as on, unquoted": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "weights.init={alpha: on, beta: 1, gamma: 1}"],
        "weights.init: alpha: true is not a number",
    ),
    "override without =": ("recipe", "fit", lambda w, t: [_recipe(w, t), "optim.steps"], "optim.steps"),
    "K = 1 expert": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tr: tr["model"].update(experts={"alpha": w["experts"]["alpha"]}))],
        "at least 2 experts",
    ),
    "duplicate dev set names": (
        "recipe",
        "fit",
        lambda w, t: [
            _recipe(w, t, lambda tr: tr["data"]["dev"][1].update(name=tr["data"]["dev"][0]["name"]))
        ],
        "dev set names must be unique",
    ),
    "name that is a path": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tr: tr["data"]["dev"][0].update(name="../escape"))],
        "'../escape'",
    ),
    "initial weights off the simplex": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "weights.init={alpha: 0.5, beta: 0.3, gamma: 0.1}"],
        "weights.init",
    ),
    "bounds that leave no feasible mixture": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "weights.bounds={alpha: [0, 0.2], beta: [0, 0.2], gamma: [0.1, 0.5]}"],
        "the upper bounds sum to 0.9, below 1",
    ),
    "group naming an unknown expert": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "weights.groups={ab: [alpha, delta]}"],
        "weights.groups 'ab' names 'delta', which is not an expert",
    ),
    "expert in two groups": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "weights.groups={ab: [alpha, beta], bc: [beta, gamma]}"],
        "expert 'beta' is in both 'ab' and 'bc'",
    ),
    "pinned weight above 1": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "weights.pinned={alpha: 1.5}"],
        "'alpha' is pinned at 1.5, above 1",
    ),
    "repetition caps that leave no feasible mixture": (
        "recipe",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            "weights.max_epochs=1",
            "weights.token_budget=1000",
            "weights.tokens={alpha: 100, beta: 200, gamma: 300}",
        ],
        "the upper bounds sum to 0.6, below 1 (alpha 0.1 (cap)",
    ),
    "repetition cap counted in the other unit": (
        "recipe",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            "weights.unit=samples",
            "weights.max_epochs=1",
            "weights.sample_budget=1000",
            "weights.tokens={alpha: 100, beta: 200, gamma: 300}",
        ],
        "weights.tokens counts tokens, but the cap counts samples (weights.unit)",
    ),
    "device without CUDA": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "device=cuda"],
        "CUDA is not available",
    ),
    "device without float64 (mps)": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "device=mps"],
        "device 'mps' is not supported: mergeopt keeps the mixture logits",
    ),
    "compute dtype the device cannot run": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "device=cpu", "model.compute_dtype=float16"],
        "model.compute_dtype float16 cannot run on the CPU",
    ),
    "GPU memory budget without a device map": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "model.max_memory={0: 70GiB}"],
        "model.max_memory is only read with model.device_map",
    ),
    "sharded stack without torchrun": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "model.shard=fsdp"],
        "model.shard fsdp shards the stack over the processes of a torchrun job",
    ),
    "sharded stack and a device map": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "model.shard=fsdp", "model.device_map=auto"],
        "model.shard fsdp and model.device_map both place the stack",
    ),
    "device map naming no device": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "model.device_map={model: gpu7, lm_head: gpu7}"],
        "model.device_map puts 'model' on 'gpu7', which is not a device",
    ),
    "device map onto a GPU this machine lacks": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "model.device_map={model: 99, lm_head: 99}"],
        "model.device_map puts 'model' on GPU 99",
    ),
    "sharded plan for one process": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "model.shard=fsdp", "--dry-run", "--world-size", "1"],
        "model.shard fsdp shards the stack over the processes of a torchrun job: plan it with --world-size N",
    ),
    "sharded micro-batch that does not split over the ranks": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "model.shard=fsdp", "--dry-run", "--world-size", "3"],
        "model.shard fsdp over 3 ranks: a micro-batch of 8 examples (optim.batch_size 4 × 2 dev sets)",
    ),
    "--device-memory without --dry-run": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "--device-memory", "80"],
        "--device-memory plans a --dry-run; a fit uses the memory its device has",
    ),
    "--json without --dry-run": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "--json"],
        "--json prints the plan of a --dry-run; a fit's result is output_dir/mixture.json",
    ),
    "evaluation dtype the device cannot run": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "device=cpu", "model.eval_dtype=float16"],
        "model.eval_dtype float16 cannot run on the CPU",
    ),
    "random base with a checkpoint expert": (
        "recipe",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            f"model.base=random://{REPO / 'tests' / 'data' / 'configs' / 'llama-100m.json'}",
        ],
        "a random:// base takes random:// experts",
    ),
    # checkpoints
    "base directory missing": (
        "checkpoint",
        "fit",
        lambda w, t: [_recipe(w, t), f"model.base={t / 'nobase'}"],
        "model.base: checkpoint directory ",  # the recipe key first, then the path
    ),
    "expert directory missing": (
        "checkpoint",
        "fit",
        lambda w, t: _with_expert(w, t, str(t / "noexpert")),
        "model.experts.alpha: checkpoint directory ",
    ),
    "expert directory missing, --dry-run": (
        "checkpoint",
        "fit",
        lambda w, t: [*_with_expert(w, t, str(t / "noexpert")), "--dry-run"],
        "model.experts.alpha: checkpoint directory ",  # the plan says what the fit says
    ),
    "tensor shape differs": (
        "checkpoint",
        "fit",
        lambda w, t: _with_expert(w, t, _expert_copy(w, t, _reshape)),
        "model.layers.0.mlp.up_proj.weight has shape",
    ),
    "vocabulary differs": ("checkpoint", "fit", _other_vocab, "vocab"),
    "expert is a quantized checkpoint": ("checkpoint", "fit", _quantized, "holds mxfp4-quantized weights"),
    "shard missing": ("checkpoint", "fit", _missing_shard, "model-00002-of-00002.safetensors"),
    "NaN in an expert": (
        "checkpoint",
        "fit",
        lambda w, t: _with_expert(w, t, _expert_copy(w, t, _nan)),
        "NaN",
    ),
    "pickle without allow_pickle": ("checkpoint", "fit", _pickled, "allow_pickle"),
    "pickle without allow_pickle, --dry-run": (
        "checkpoint",
        "fit",
        lambda w, t: [*_pickled(w, t), "--dry-run"],
        "holds only pickle weights",  # the plan refuses what the fit refuses, not 'verdict: fits'
    ),
    # adapters
    "base given as a hub name": (
        "checkpoint",
        "fit",
        lambda w, t: [_recipe(w, t), "model.base=HuggingFaceTB/SmolLM2-135M-Instruct"],
        "it reads as a Hugging Face hub name, but mergeopt downloads nothing: fetch it first (hf download",
    ),
    "base without a tokenizer": ("checkpoint", "fit", _base_without_tokenizer, "holds no tokenizer (none of"),
    "expert is a trainer's output directory without its final save": (
        "adapter",
        "fit",
        _trainer_output_without_final_save,
        "trl-out has no config.json: a trainer's output directory without its final save, holding 2 "
        "checkpoint-N save(s): give one of them, the latest is ",
    ),
    "adapter of another base": ("adapter", "fit", _adapter_other_base, "is a LoRA adapter trained on"),
    "adapter of another base, planned": (
        "adapter",
        "fit",
        lambda w, t: [*_adapter_other_base(w, t), "--dry-run"],
        "is a LoRA adapter trained on",  # the plan checks what the fit checks
    ),
    "adapter of another hub base": (
        "adapter",
        "fit",
        _adapter_other_hub_base,
        "is a LoRA adapter trained on",
    ),
    "adapter beside a full model": ("adapter", "fit", _adapter_beside_a_model, "holds both a PEFT adapter"),
    "PiSSA adapter not converted": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(w, t, _adapter(w, t, init_lora_weights="pissa")),
        "init_lora_weights is 'pissa' in adapter_config.json: PEFT trains such an adapter over base weights",
    ),
    "adapter for a resized vocabulary": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(w, t, _adapter(w, t, resized=True, modules_to_save=["lm_head"])),
        "needs the base resized",
    ),
    "adapter of a tied output layer": (
        "adapter",
        "fit",
        _adapter_of_a_tied_head,
        "adapts lm_head, whose weight the base ties to its input embedding",
    ),
    "adapter module not in the base": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(
            w, t, _adapter(w, t, rename=("0.self_attn.q_proj", "0.self_attn.nope_proj"))
        ),
        "nope_proj",
    ),
    "adapter target_parameters naming nothing": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(w, t, _adapter(w, t, target_parameters=["mlp.nope_proj"])),
        "target_parameters ['mlp.nope_proj'] names no parameter of the base",
    ),
    # dev sets
    "dev set missing": (
        "dev set",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tr: tr["data"]["dev"][0].update(path=str(t / "gone.jsonl")))],
        "gone.jsonl",
    ),
    "dev set line not JSON": (
        "dev set",
        "fit",
        lambda w, t: _dev(w, t, '{"text": "a"}\n{"text": \n'),
        "dev.jsonl:2",
    ),
    "empty dev set": ("dev set", "fit", lambda w, t: _dev(w, t, ""), "dev.jsonl"),
    "record without text or completion": (
        "dev set",
        "fit",
        lambda w, t: _dev(w, t, None, [{"question": "1+1"}] * 4),
        "dev.jsonl:1",
    ),
    "conversation without an answer": (
        "dev set",
        "fit",
        lambda w, t: _dev(w, t, None, [{"messages": [{"role": "user", "content": "1+1="}]}] * 4),
        "dev.jsonl:1: 'messages' has no assistant message with content",
    ),
    "conversation without a chat template": (
        "dev set",
        "fit",
        lambda w, t: _dev(
            w,
            t,
            None,
            [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}] * 4,
        ),
        "dev.jsonl: record 1: a conversation needs a chat template",
    ),
    "chat template missing": (
        "dev set",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tr: tr["data"].update(chat_template=str(t / "chatml.jinja")))],
        "chatml.jinja does not exist",
    ),
    "chat template directory without one": (
        "dev set",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tr: tr["data"].update(chat_template=_empty_dir(t / "tokenizer")))],
        "holds no chat template",
    ),
    "conversation role misspelt": (
        "dev set",
        "fit",
        lambda w, t: _dev(w, t, None, [{"messages": [{"role": "sytem", "content": "Be brief."}, *_QA]}] * 4),
        "dev.jsonl:1: messages message 0 has role 'sytem' (did you mean 'system'?)",
    ),
    "chat template raising a Python error": (
        "dev set",
        "fit",
        lambda w, t: _chat_dev(w, t, "{% for m in messages %}{{ m.content + 1 }}{% endfor %}"),
        "dev.jsonl: record 1: the chat template failed on the conversation (TypeError: ",
    ),
    "chat template rendering nothing": (
        "dev set",
        "fit",
        lambda w, t: _chat_dev(w, t, "{% for m in messages %}{% endfor %}"),
        "dev.jsonl: record 1: the chat template renders the conversation as no tokens at all",
    ),
    "chat template writing no assistant turn": (
        "dev set",
        "fit",
        lambda w, t: _chat_dev(
            w, t, "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
        ),
        "dev.jsonl: record 1: the chat template writes no tokens of the assistant's messages: nothing to score",
    ),
    "conversation's template inputs setting an argument of apply_chat_template": (
        "dev set",
        "fit",
        lambda w, t: _chat_dev(
            w,
            t,
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
            {"messages": _QA, "chat_template_kwargs": {"add_generation_prompt": True}},
        ),
        "dev.jsonl:1: 'chat_template_kwargs' sets 'add_generation_prompt', an argument of apply_chat_template",
    ),
    "chat template leaving out what the assistant says": (
        "dev set",
        "fit",
        lambda w, t: _chat_dev(
            w,
            t,
            "{% for m in messages %}{{ m.role }}: {% if m.role != 'assistant' %}{{ m.content }}{% endif %}"
            "\n{% endfor %}",
        ),
        "dev.jsonl: record 1: the chat template writes nothing of what the assistant's messages say",
    ),
    "dev set that is a test split": (
        "dev set",
        "fit",
        lambda w, t: [
            _recipe(w, t, lambda tr: tr["data"]["dev"][0].update(path=str(t / "gsm8k_test.jsonl")))
        ],
        "gsm8k_test.jsonl) looks like a benchmark's test split (its file name",
    ),
    "lm-eval task scored on its test split": (
        "objective",
        "fit",
        _test_split_task,
        "task 'gsm8k_local' is scored on its test split 'test'",
    ),
    "objective term option another kind reads": (
        "objective",
        "fit",
        lambda w, t: [
            _recipe(
                w,
                t,
                lambda tr: tr.update(
                    objective={"terms": [{"kind": "exact_match", "dev": "arith", "limit": 20}]},
                    search={"strategy": "grid"},
                ),
            )
        ],
        "limit is only for kind 'lm_eval', not 'exact_match'",
    ),
    "objective term named like a column of evaluations.csv": (
        "recipe",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            "search.strategy=grid",
            "objective.terms=[{kind: loss, dev: arith, name: value}, {kind: loss, dev: markov}]",
        ],
        "objective.terms[0].name 'value' is a column of the search's evaluations.csv",
    ),
    "grid lattice of millions of mixtures without a budget": (
        "search",
        "fit",
        lambda w, t: [_recipe(w, t), "search.strategy=grid", "search.grid.divisions=2000"],
        "search.grid.divisions=2000 over 3 experts is a lattice of 2,003,001 mixtures",
    ),
    "search budget below the experts a normalisation scores": (
        "search",
        "fit",
        lambda w, t: [
            _recipe(
                w,
                t,
                lambda tr: tr.update(
                    objective={"normalize": "experts", "terms": [{"kind": "loss", "dev": "arith"}]},
                    search={"strategy": "dirichlet", "budget": 2},
                ),
            )
        ],
        "search.budget 2 cannot even score the 3 experts",
    ),
    "lm-eval task whose data file is missing": (
        "objective",
        "fit",
        _task_without_data,
        "lm-eval task 'arith_local' could not load its data (FileNotFoundError",
    ),
    "lm-eval term seeking its task's metric the wrong way": (
        "objective",
        "fit",
        _perplexity_maximised,
        "task 'arith_ppl' declares perplexity better lower, but the term has higher_is_better: true",
    ),
    # grid tables
    "grid without a mixture column": (
        "grid table",
        "rank",
        lambda w, t: _grid(w, t, lambda rows: [r.pop("w_gamma") for r in rows]),
        "w_gamma",
    ),
    "grid with NaN": (
        "grid table",
        "rank",
        lambda w, t: _grid(w, t, lambda rows: rows[1].update(loss_arith=float("nan"))),
        "grid.csv line 3: column loss_arith (the true loss of dev set 'arith') is empty or not a finite number",
    ),
    "grid separated by semicolons": (
        "grid table",
        "rank",
        _semicolon_grid,
        "grid.csv: the header is separated by semicolons, not commas",
    ),
    "calibration grid separated by semicolons": (
        "grid table",
        "calibrate",
        _semicolon_grid,
        "grid.csv: the header is separated by semicolons, not commas",
    ),
    "grid weights off the simplex": (
        "grid table",
        "rank",
        lambda w, t: _grid(w, t, lambda rows: rows[0].update(w_alpha=0.7)),
        "grid.csv line 2: weights sum to 0.7, not 1 (±0.005)",
    ),
    "calibration metric unknown": (
        "recipe value",
        "calibrate",
        lambda w, t: _calibration_grid(w, t, lambda tr: tr.update(calibrate={"metric": "accuracy"})),
        "calibrate.metric: 'accuracy' is not 'target', a dev set or an objective term",
    ),
    "calibration grid of another recipe's runs": (
        "grid table",
        "calibrate",
        lambda w, t: _calibration_grid(w, t, run_fingerprint="ffff0000"),
        "grid.csv line 2: its run was trained by another recipe (fingerprint ffff0000 in ",
    ),
    "calibration grid naming one run twice": (
        "grid table",
        "calibrate",
        lambda w, t: _calibration_grid(w, t, run_fingerprint="0123abcd"),
        "grid.csv line 3: the same run (",
    ),
    "calibration grid naming one checkpoint twice": (
        "grid table",
        "calibrate",
        _grid_naming_one_checkpoint_twice,
        "grid.csv line 4: the same run (runs/a) as line 2: keep one row per run",
    ),
    "calibration grid of no run, without the proxy": (
        "grid table",
        "calibrate",
        _no_run_grid_without_proxy,
        "grid.csv: no run yet, and calibrate.use_proxy is false: the model without the proxy is a "
        "regression on the runs alone",
    ),
    # mixtures
    "merge weights off the simplex": (
        "mixture",
        "merge",
        lambda w, t: [_recipe(w, t), "--weights", "alpha=0.5,beta=0.3,gamma=0.1", "--out", str(t / "out")],
        "sum",
    ),
    "merge weights name unknown": (
        "mixture",
        "merge",
        lambda w, t: [_recipe(w, t), "--weights", "alpha=0.5,delta=0.5", "--out", str(t / "out")],
        "delta",
    ),
    "a mixture.json given as the recipe": (
        "recipe",
        "merge",
        lambda w, t: [
            str(_finished_run(w, t) / "mixture.json"),
            "--weights",
            "alpha=1",
            "--out",
            str(t / "out"),
        ],
        "mixture.json is a run's result file (mixture.json), not a recipe",
    ),
    "unfinished mixture.json": (
        "mixture",
        "merge",
        lambda w, t: [
            _recipe(w, t),
            "--mixture",
            str(_finished_run(w, t, lambda m: m.update(status="running"))),
            "--out",
            str(t / "out"),
        ],
        "did not finish",
    ),
    "mixture fitted on other checkpoints": (
        "mixture",
        "merge",
        lambda w, t: [
            _recipe(w, t, _swap_alpha_and_beta),
            "--mixture",
            str(_finished_run(w, t)),
            "--out",
            str(t / "out"),
        ],
        "read expert 'alpha' from",
    ),
    # exports
    "export unknown format": (
        "export",
        "export",
        lambda w, t: [str(_finished_run(w, t)), "--to", "nope", "--out", str(t / "out")],
        "'nope'",
    ),
    "export negative weight": (
        "export",
        "export",
        lambda w, t: [
            str(_finished_run(w, t, lambda m: m["weights"].update(alpha=-0.1, beta=0.9))),
            "--to",
            "doremi",
            "--out",
            str(t / "out"),
        ],
        "alpha",
    ),
    "export weights outside the recorded constraints": (
        "export",
        "export",
        lambda w, t: [
            str(_finished_run(w, t, lambda m: m.update(constraints=_recorded(upper={"alpha": 0.4})))),
            "--to",
            "doremi",
            "--out",
            str(t / "out"),
        ],
        "the weight of 'alpha' is 0.5, outside [0, 0.4]",
    ),
    "export budget beyond the fit's repetition cap": (
        "export",
        "export",
        lambda w, t: [
            str(_finished_run(w, t, lambda m: m.update(constraints=_recorded(max_epochs=2.0)))),
            "--to",
            "doremi",
            "--budget-tokens",
            "100000",
            "--out",
            str(t / "out"),
        ],
        "repeats source 'alpha' (1,000 tokens recorded in mixture.json) 50 times, above the fit's weights.max_epochs 2",
    ),
    "export --weights-are against the unit mixture.json records": (
        "export",
        "export",
        lambda w, t: [
            str(_finished_run(w, t, lambda m: m.update(unit="samples"))),
            "--to",
            "doremi",
            "--weights-are",
            "tokens",
            "--out",
            str(t / "out"),
        ],
        "records its weights as sample shares (weights.unit: samples), so --weights-are tokens would "
        "misread them",
    ),
    "export mixture.json whose cap counts another unit than its weights": (
        "export",
        "export",
        lambda w, t: [
            str(
                _finished_run(w, t, lambda m: m.update(unit="samples", constraints=_recorded(max_epochs=2.0)))
            ),
            "--to",
            "doremi",
            "--out",
            str(t / "out"),
        ],
        "the repetition cap counts tokens but the weights are sample shares (unit samples)",
    ),
    "export --out onto the fit's own mixture.json": (
        "export",
        "export",
        lambda w, t: [str(_finished_run(w, t)), "--to", "doremi", "--out", str(t / "run" / "mixture.json")],
        "mixture.json is an input of this export",
    ),
    "export unknown dataset name": (
        "export",
        "export",
        lambda w, t: [
            str(_finished_run(w, t)),
            "--to",
            "hf-datasets",
            "--datasets",
            f"delta={w['dev']['arith']}",
            "--out",
            str(t / "out"),
        ],
        "delta",
    ),
    "export --tokenizer missing": (
        "option",
        "export",
        lambda w, t: [
            *_export_to(w, t, "trl", {n: w["dev"]["arith"] for n in ("alpha", "beta", "gamma")}),
            "--tokenizer",
            str(t / "no-tokenizer"),
        ],
        "no-tokenizer does not exist",
    ),
    "export budget repeats a dataset": (
        "export",
        "export",
        lambda w, t: [
            str(_finished_run(w, t)),
            "--to",
            "hf-datasets",
            "--datasets",
            *(f"{n}={w['dev']['arith']}" for n in ("alpha", "beta", "gamma")),
            "--budget-samples",
            "1000",
            "--out",
            str(t / "out"),
        ],
        "--max-epochs",
    ),
    "export dataset line not JSON": (
        "export",
        "export",
        lambda w, t: _export_to(
            w, t, "all", {"alpha": w["dev"]["arith"], "beta": _broken_jsonl(t), "gamma": w["dev"]["arith"]}
        ),
        "broken.jsonl:3: not valid JSON (Expecting ':' delimiter)",
    ),
    "export a source too small for whole samples": (
        "export",
        "export",
        lambda w, t: [
            str(
                _finished_run(w, t, lambda m: m["weights"].update(alpha=0.9999, beta=0.00005, gamma=0.00005))
            ),
            "--to",
            "trl",
            "--datasets",
            *(f"{n}={w['dev']['arith']}" for n in ("alpha", "beta", "gamma")),
            "--out",
            str(t / "out"),
        ],
        "--to trl takes whole samples, and sources 'beta' (sample share 5e-05), 'gamma'",
    ),
    "export llamafactory name with a comma": (
        "export",
        "export",
        lambda w, t: [
            str(_finished_run(w, t, lambda m: m.update(weights={"alpha,x": 0.5, "beta": 0.3, "gamma": 0.2}))),
            "--to",
            "llamafactory",
            "--out",
            str(t / "out"),
        ],
        "'alpha,x'",
    ),
    "export llm-foundry streams over one directory": (
        "export",
        "export",
        lambda w, t: _export_to(
            w, t, "llm-foundry", dict.fromkeys(("alpha", "beta", "gamma"), w["dev"]["arith"])
        ),
        "Reused local directory",
    ),
    "export olmo-core np.save file": (
        "export",
        "export",
        lambda w, t: _export_to(
            w, t, "olmo-core", dict.fromkeys(("alpha", "beta", "gamma"), _np_save_file(t))
        ),
        "is an np.save file",
    ),
    "export Megatron .bin without its .idx": (
        "export",
        "export",
        lambda w, t: [
            *_export_to(w, t, "megatron", dict.fromkeys(("alpha", "beta", "gamma"), _lonely_bin(t))),
            "--budget-tokens",
            "1000",
        ],
        "tokens.idx, which is missing",
    ),
    "export MDS directory with a corrupt index.json": (
        "export",
        "export",
        lambda w, t: [
            *_export_to(w, t, "megatron", dict.fromkeys(("alpha", "beta", "gamma"), _corrupt_mds(t))),
            "--budget-tokens",
            "1000",
        ],
        "index.json: not a readable MDS index",
    ),
    "export MDS directory with a corrupt zstd shard": (
        "export",
        "export",
        lambda w, t: _export_to(
            w, t, "llm-foundry", {n: _corrupt_zstd_mds(t, n) for n in ("alpha", "beta", "gamma")}
        ),
        "shard.00000.mds.zstd: not a readable zstd shard",
    ),
    "export MDS root of several splits": (
        "export",
        "export",
        lambda w, t: _export_to(
            w, t, "llm-foundry", {n: _split_root(t, n) for n in ("alpha", "beta", "gamma")}
        ),
        "no index.json but 2 MDS splits (train, val)",
    ),
    "export unknown --token-dtype": (
        "option",
        "export",
        lambda w, t: [
            *_export_to(w, t, "olmo-core", dict.fromkeys(("alpha", "beta", "gamma"), _empty_tokens(t))),
            "--budget-tokens",
            "1000",
            "--token-dtype",
            "float32",
        ],
        "--token-dtype float32: token ids are stored as one of uint8, uint16",
    ),
    "export empty OLMo token file": (
        "export",
        "export",
        lambda w, t: [
            *_export_to(w, t, "olmo-core", dict.fromkeys(("alpha", "beta", "gamma"), _empty_tokens(t))),
            "--budget-tokens",
            "1000",
            "--token-dtype",
            "uint16",
            "--eos-id",
            "2",
        ],
        "empty.npy: the dataset is empty",
    ),
    "export axolotl multiple-choice records": (
        "export",
        "export",
        lambda w, t: _export_to(
            w,
            t,
            "axolotl",
            {"alpha": _multiple_choice(t), "beta": w["dev"]["arith"], "gamma": w["dev"]["arith"]},
        ),
        "multiple-choice",
    ),
    # issue 18: checks up front (output paths, numbers, seeds, files that must parse, argparse)
    "fit output_dir is a file": (
        "output",
        "fit",
        lambda w, t: [_recipe(w, t), f"output_dir={malformed.a_file(t)}"],
        "a-file is a file, not a directory",
    ),
    "train output_dir is a file": (
        "output",
        "train",
        lambda w, t: _train_recipe(w, t, lambda tr: tr["train"].update(output_dir=malformed.a_file(t))),
        "train.output_dir",
    ),
    "merge --out cannot be created": (
        "output",
        "merge",
        lambda w, t: _merge_to(w, t, malformed.UNCREATABLE),
        "cannot be created",
    ),
    "merge --out is a file": (
        "output",
        "merge",
        lambda w, t: _merge_to(w, t, malformed.a_file(t)),
        "a-file is a file, not a directory",
    ),
    "rank --out is a file": (
        "output",
        "rank",
        lambda w, t: [*_grid(w, t, lambda rows: None), "--out", malformed.a_file(t)],
        "a-file is a file, not a directory",
    ),
    "calibrate --out cannot be created": (
        "output",
        "calibrate",
        lambda w, t: [*_calibration_grid(w, t), "--out", malformed.UNCREATABLE],
        "cannot be created",
    ),
    "export --out cannot be created": (
        "output",
        "export",
        lambda w, t: [str(_finished_run(w, t)), "--to", "doremi", "--out", malformed.UNCREATABLE],
        "cannot be created",
    ),
    "transfer --out is a file": (
        "output",
        "transfer",
        lambda w, t: [
            *_two_tables(t, *[{"w_a": [1.0, 0.0, 0.5], "w_b": [0.0, 1.0, 0.5], "loss": [1.0, 2.0, 1.5]}] * 2)[
                :2
            ],
            "--out",
            malformed.a_file(t),
        ],
        "a-file is a file, not a directory",
    ),
    "diagnose --out is a file": (
        "output",
        "diagnose",
        lambda w, t: [_recipe(w, t), "--out", malformed.a_file(t)],
        "a-file is a file, not a directory",
    ),
    "world cache is a file": (
        "output",
        "fit",
        lambda w, t: [_recipe(w, t), f"world.cache_dir={malformed.a_file(t)}", "model.base=tiny://base"],
        "a-file is a file, not a directory",
    ),
    "infinite learning rate": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "optim.lr=.inf"],
        "optim.lr: Input should be a finite number",
    ),
    "NaN in a train mixture list": (
        "recipe",
        "train",
        lambda w, t: _train_recipe(
            w,
            t,
            lambda tr: tr["train"].update(
                mixtures={"kind": "list", "weights": [{"alpha": float("nan"), "beta": 0.5, "gamma": 0.5}]}
            ),
        ),
        "train.mixtures.weights.0.alpha: Input should be a finite number",
    ),
    "train mixture without every expert": (
        "recipe",
        "train",
        lambda w, t: _train_recipe(
            w,
            t,
            lambda tr: tr["train"].update(
                mixtures={"kind": "list", "weights": [{"alpha": 0.5, "beta": 0.5}]}
            ),
        ),
        "train.mixtures.weights[0] lacks ['gamma'] (give every expert, 0 included)",
    ),
    "train mixture naming an unknown expert": (
        "recipe",
        "train",
        lambda w, t: _train_recipe(
            w,
            t,
            lambda tr: tr["train"].update(
                mixtures={
                    "kind": "list",
                    "weights": [{"alpha": 0.5, "beta": 0.5, "gamma": 0.0, "delta": 0.0}],
                }
            ),
        ),
        "train.mixtures.weights[0] names ['delta'], not experts (the experts are ['alpha', 'beta', 'gamma'])",
    ),
    "train interior lattice without a point": (
        "recipe",
        "train",
        lambda w, t: _train_recipe(
            w,
            t,
            lambda tr: tr["train"].update(
                mixtures={"kind": "lattice", "divisions": 2, "interior_only": True}
            ),
        ),
        "train.mixtures: an interior_only lattice of divisions 2 over 3 experts holds no mixture",
    ),
    "dev set weight past float32": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "data.dev.0.weight=1.0e308"],
        "data.dev.0.weight: 1.0e308 is out of range: it must be <= 1e+30",
    ),
    "recipe seed out of range": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), f"seed={2**63}"],
        "seed: 9223372036854775808 is out of range: it must be <= 9223372036854775807",
    ),
    "export --max-epochs nan": (
        "option",
        "export",
        lambda w, t: [
            str(_finished_run(w, t)),
            "--to",
            "doremi",
            "--max-epochs",
            "nan",
            "--out",
            str(t / "out"),
        ],
        "argument --max-epochs: 'nan' is not a finite number above 0",
    ),
    "transfer seed out of range": (
        "option",
        "transfer",
        lambda w, t: [*_two_tables(t, {"w_a": [1.0]}, {"w_a": [1.0]}), "--seed", "-1"],
        "argument --seed: '-1' is not a seed",
    ),
    "rank tables bootstrap beyond memory": (
        "option",
        "rank",
        lambda w, t: _rank_tables(t, RANK_TABLE, RANK_TABLE, "--bootstrap", "10000000000000"),
        "10,000,000,000,000 bootstrap resamples of 3 mixtures draw 30,000,000,000,000 scores",
    ),
    "unknown option": (
        "option",
        "fit",
        lambda w, t: [_recipe(w, t), "--dry_run"],
        "unrecognized arguments: --dry_run (did you mean '--dry-run'?) (see mergeopt fit --help)",
    ),
    "recipe is a directory": (
        "recipe",
        "fit",
        lambda w, t: [str(_mkdir(t / "recipes"))],
        "is a directory, not a file",
    ),
    "expert is a file": (
        "checkpoint",
        "fit",
        lambda w, t: _with_expert(w, t, malformed.a_file(t)),
        "a-file is a file, not a directory",
    ),
    "dev set is a directory": (
        "dev set",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tree: tree["data"]["dev"][0].update(path=malformed.a_dir(t)))],
        "is a directory but not a saved dataset",
    ),
    "base config.json disagrees with its weights": (
        "checkpoint",
        "fit",
        lambda w, t: [_recipe(w, t), f"model.base={malformed.config_disagreeing(w, t)}"],
        "wide-base/config.json disagrees with the base's weights",
    ),
    "base config.json: linear attention without its shapes, --dry-run": (
        "checkpoint",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            f"model.base={malformed.linear_attention_without_shapes(w, t)}",
            "--dry-run",
        ],
        "config.json has linear_attention layers but no linear_num_key_heads",
    ),
    "base config.json: latent attention without its widths, --dry-run": (
        "checkpoint",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            f"model.base={malformed.latent_attention_without_widths(w, t)}",
            "--dry-run",
        ],
        "config.json has kv_lora_rank (latent attention) but no integer qk_nope_head_dim",
    ),
    "base model.safetensors truncated, --dry-run": (
        "checkpoint",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            f"model.base={malformed.truncated(malformed.copy_of(w['base'], t, 'cut'), 'model.safetensors')}",
            "--dry-run",
        ],
        "not a readable safetensors file",
    ),
    "adapter config a JSON list": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(w, t, malformed.adapter_with(t, w, lambda c: [c])),
        "adapter_config.json must hold a JSON object, not list",
    ),
    "adapter rank_pattern 0": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(
            w, t, malformed.adapter_with(t, w, lambda c: {**c, "rank_pattern": {"q_proj": 0}})
        ),
        "rank_pattern['q_proj'] is 0, not a positive whole number",
    ),
    "adapter pattern key not a regex": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(
            w, t, malformed.adapter_with(t, w, lambda c: {**c, "alpha_pattern": {"q_proj(": 4}})
        ),
        "alpha_pattern key 'q_proj(' is not a valid regex",
    ),
    "adapter alpha_pattern not a number": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(
            w, t, malformed.adapter_with(t, w, lambda c: {**c, "alpha_pattern": {"q_proj": "big"}})
        ),
        "alpha_pattern['q_proj'] is 'big', not a positive number",
    ),
    "adapter safetensors truncated, --dry-run": (
        "adapter",
        "fit",
        lambda w, t: [
            *_with_expert(w, t, malformed.truncated(_adapter(w, t), "adapter_model.safetensors")),
            "--dry-run",
        ],
        "not a readable safetensors file",
    ),
    "adapter safetensors truncated": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(w, t, malformed.truncated(_adapter(w, t), "adapter_model.safetensors")),
        "not a readable safetensors file",
    ),
    "rank --mixture not valid JSON": (
        "mixture",
        "rank",
        lambda w, t: [
            *_grid(w, t, lambda rows: None),
            "--mixture",
            _damaged_json(t),
            "--out",
            str(t / "out"),
        ],
        "not valid JSON",
    ),
    "rank --mixture with a NaN weight": (
        "mixture",
        "rank",
        lambda w, t: [
            *_grid(w, t, lambda rows: None),
            "--mixture",
            str(_finished_run(w, t, lambda m: m["weights"].update(alpha=float("nan")))),
            "--out",
            str(t / "out"),
        ],
        "alpha",
    ),
    "LoRA target_modules match nothing": (
        "recipe",
        "train",
        lambda w, t: _train_recipe(
            w, t, lambda tr: tr["train"].update(method="lora", lora={"target_modules": ["nope_proj"]})
        ),
        "train.lora.target_modules 'nope_proj' matches no module of the base",
    ),
    "train output_dir inside the base's checkpoint": (
        "output directory",
        "train",
        lambda w, t: _train_recipe(
            w, t, lambda tr: tr["train"].update(output_dir=str(Path(tr["model"]["base"]) / "runs"))
        ),
        "train.output_dir",
    ),
    # issue 18: run directories (owned, published whole)
    "output_dir empty": (
        "output directory",
        "fit",
        lambda w, t: [_recipe(w, t), "output_dir="],
        "output_dir is empty",
    ),
    "output_dir is the current directory": (
        "output directory",
        "fit",
        lambda w, t: [_recipe(w, t), "output_dir=."],
        "is the current directory",
    ),
    "output_dir is an expert's checkpoint": (
        "output directory",
        "fit",
        _output_into_an_expert,
        "alpha-copy is the directory of model.experts.alpha",
    ),
    "diagnose --out into an expert's checkpoint": (
        "output directory",
        "diagnose",
        lambda w, t: _out_into_an_expert(w, t),
        "alpha-copy is the directory of model.experts.alpha (",
    ),
    "transfer --out a parent of the current directory": (
        "output directory",
        "transfer",
        lambda w, t: [*_two_tables(t, _TABLE, _TABLE)[:2], "--bootstrap", "0", "--out", ".."],
        "is a parent of the current directory",
    ),
    "transfer surrogate min-child-samples above 20": (
        "option",
        "transfer",
        lambda w, t: [
            *_two_tables(t, RANK_TABLE, RANK_TABLE)[1:],
            "--surrogate-fit",
            str(t / "small.csv"),
            "--min-child-samples",
            "30",
        ],
        "small.csv: only 3 run(s) to fit the surrogate on; with --min-child-samples 30",
    ),
    "fit resumed after its dev file changed": (
        "checkpoint",
        "fit",
        lambda w, t: _checkpoint_then_changed_dev(w, t),
        "arith.jsonl changed since",
    ),
    # issue 18: degenerate inputs
    "max_length above the base's positions": (
        "recipe value",
        "fit",
        lambda w, t: [_recipe(w, t), "data.max_length=100000"],
        "data.max_length=100000 is above the base's position limit (max_position_embeddings 64",
    ),
    "dry-run max_length above the base's positions": (
        "recipe value",
        "fit",
        lambda w, t: [_recipe(w, t), "data.max_length=100000", "--dry-run"],
        "data.max_length=100000 is above the base's position limit (max_position_embeddings 64",
    ),
    "default max_length above the base's positions": (
        "recipe value",
        "fit",
        lambda w, t: [_recipe(w, t, lambda tree: tree["data"].pop("max_length"))],
        "data.max_length defaults to 256, which is above the base's position limit (max_position_embeddings 64",
    ),
    "train max_length above the base's positions": (
        "recipe value",
        "train",
        lambda w, t: _train_recipe(w, t, lambda tr: tr["train"].update(max_length=1000)),
        "train.max_length=1000 is above the base's position limit (max_position_embeddings 64",
    ),
    "expert equal to the base": (
        "checkpoint",
        "fit",
        lambda w, t: _with_expert(w, t, w["base"]),
        "expert 'alpha' equals the base model in every merged parameter",
    ),
    "expert equal to the base (TIES)": (
        "checkpoint",
        "fit",
        lambda w, t: _with_expert(w, t, w["base"], "merge.method=ties"),
        "expert 'alpha' equals the base model in every merged parameter",
    ),
    "TIES density that keeps nothing": (
        "recipe",
        "fit",
        lambda w, t: [_recipe(w, t), "merge.method=ties", "merge.density=1e-9", "search.strategy=grid"],
        "merge.density=1e-09 keeps less than one entry of even the largest merged tensor",
    ),
    "one expert under two names": (
        "checkpoint",
        "fit",
        lambda w, t: [_recipe(w, t), f"model.experts.beta={w['experts']['alpha']}"],
        "experts 'alpha' and 'beta' are identical in every merged parameter",
    ),
    "two experts, one checkpoint": (  # no parameter differs at all: the pair is still named
        "checkpoint",
        "fit",
        lambda w, t: [
            _recipe(w, t),
            f"model.experts={{alpha: {w['experts']['alpha']}, beta: {w['experts']['alpha']}}}",
        ],
        "experts 'alpha' and 'beta' are identical in every merged parameter",
    ),
    "every expert the base": (
        "checkpoint",
        "fit",
        lambda w, t: [_recipe(w, t), f"model.experts={{alpha: {w['base']}, beta: {w['base']}}}"],
        "the experts 'alpha', 'beta' do not differ from the base in any merged parameter",
    ),
    "two experts with identical tensors": (
        "checkpoint",
        "merge",
        lambda w, t: [
            _recipe(w, t),
            f"model.experts.gamma={shutil.copytree(w['experts']['beta'], t / 'copy')}",
            "--weights",
            "alpha=0.5,beta=0.3,gamma=0.2",
            "--out",
            str(t / "out"),
        ],
        "experts 'beta' and 'gamma' are identical in every merged parameter",
    ),
    "untrained LoRA adapter": (
        "adapter",
        "fit",
        lambda w, t: _with_expert(w, t, _adapter(w, t)),
        "expert 'alpha' equals the base model in every merged parameter",
    ),
    "dev set of unknown tokens": (
        "dev set",
        "fit",
        lambda w, t: _dev(w, t, None, [{"text": "приветмиркакдела"}] * 8),
        "100% of its scored tokens are the unknown token '<unk>'",
    ),
    "training set of unknown tokens": (
        "training set",
        "train",
        lambda w, t: _train_recipe(
            w,
            t,
            lambda tr: tr["train"]["data"].update(
                alpha=str(write_jsonl(t / "unk.jsonl", [{"text": "日本語のテキスト"}] * 4))
            ),
        ),
        "unk.jsonl: 100% of its scored tokens are the unknown token '<unk>'",
    ),
    "merge overflows the output dtype": (
        "mixture",
        "merge",
        lambda w, t: [
            _recipe(w, t),
            "merge.scale=1e7",
            "--weights",
            "alpha=0.5,beta=0.3,gamma=0.2",
            "--dtype",
            "float16",
            "--out",
            str(t / "out"),
        ],
        "overflows float16",
    ),
    "grid measured on other records of a dev set": (
        "grid table",
        "rank",
        lambda w, t: _grid_measured_on_fewer_records(w, t),
        "its loss_arith was measured on 5 records of dev set 'arith' (data.max_examples 5), and this "
        "recipe reads 20 records (data.max_examples null): rerun mergeopt train",
    ),
    "grid rows all one mixture": (
        "grid table",
        "rank",
        lambda w, t: _grid(w, t, lambda rows: [r.update(w_alpha=1.0, w_beta=0.0, w_gamma=0.0) for r in rows]),
        "all 3 row(s) hold the same mixture",
    ),
    "rank tables rows all one mixture": (
        "grid table",
        "rank",
        lambda w, t: _rank_tables(
            t,
            {"w_a": [0.5] * 3, "w_b": [0.5] * 3, "loss": [1.0, 2.0, 3.0]},
            {"w_a": [0.5], "w_b": [0.5], "loss": [1.0]},
        ),
        "hold the same mixture",
    ),
    "rank tables metric is bookkeeping": (
        "option",
        "rank",
        lambda w, t: _rank_tables(t, RANK_TABLE, RANK_TABLE, "--metrics", "loss,run"),
        "--metrics run: run is a bookkeeping column, not a metric",
    ),
    "rank tables empty --metrics": (
        "option",
        "rank",
        lambda w, t: _rank_tables(t, RANK_TABLE, RANK_TABLE, "--metrics", ""),
        "argument --metrics: '' names no column",
    ),
    "transfer --mixture-columns naming a column twice": (
        "option",
        "transfer",
        lambda w, t: [*_two_tables(t, RANK_TABLE, RANK_TABLE), "--mixture-columns", "w_a,w_b,w_a"],
        "argument --mixture-columns: 'w_a,w_b,w_a' names 'w_a' twice",
    ),
    "rank tables metric is a weight": (
        "option",
        "rank",
        lambda w, t: _rank_tables(t, RANK_TABLE, RANK_TABLE, "--metrics", "w_b"),
        "--metrics w_b: w_b is a mixture weight, not a metric",
    ),
    "transfer tables rows all one mixture": (
        "grid table",
        "transfer",
        lambda w, t: _two_tables(
            t,
            {"w_a": [0.5, 0.5], "w_b": [0.5, 0.5], "loss": [1.0, 2.0]},
            {"w_a": [1.0, 0.0], "w_b": [0.0, 1.0], "loss": [1.0, 2.0]},
        ),
        "hold the same mixture",
    ),
    "rank tables text in a metric column": (
        "score table",
        "rank",
        lambda w, t: _rank_tables(t, {**RANK_TABLE, "loss": [1.0, "abc", 3.0]}, RANK_TABLE),
        "proxy.csv line 3: column loss is empty or not a finite number",
    ),
    "rank tables negative weight": (
        "score table",
        "rank",
        lambda w, t: _rank_tables(
            t, RANK_TABLE, {**RANK_TABLE, "w_a": [1.0, 1.1, 0.0], "w_b": [0.0, -0.1, 1.0]}
        ),
        "truth.csv line 3: weight w_b is negative (-0.1)",
    ),
    "rank tables repeated mixture": (
        "score table",
        "rank",
        lambda w, t: _rank_tables(
            t,
            {"w_a": [1.0, 0.5, 0.0, 0.5], "w_b": [0.0, 0.5, 1.0, 0.5], "loss": [1.0, 2.0, 3.0, 2.5]},
            RANK_TABLE,
        ),
        "proxy.csv line 3; average repeated runs of a mixture into one row first",
    ),
    "rank tables two mixtures": (
        "score table",
        "rank",
        lambda w, t: _rank_tables(t, {"w_a": [1.0, 0.5], "w_b": [0.0, 0.5], "loss": [1.0, 2.0]}, RANK_TABLE),
        "share only 2 mixture(s); the rank statistics need at least 3",
    ),
    "rank tables separated by semicolons": (
        "score table",
        "rank",
        lambda w, t: _semicolon_proxy(t),
        "proxy.csv: the header is separated by semicolons, not commas",
    ),
    "rank tables column named twice": (
        "score table",
        "rank",
        lambda w, t: _rank_tables_text(t, "w_a,w_b,loss,loss\n1,0,1,5\n0.5,0.5,2,6\n0,1,3,4\n"),
        "proxy.csv: the header names column 'loss' twice",
    ),
    "rank tables row with a cell too many": (
        "score table",
        "rank",
        lambda w, t: _rank_tables_text(t, "w_a,w_b,loss\n1,0,1,6\n0.5,0.5,2\n0,1,3\n"),
        "proxy.csv line 2: 4 cells, but the header names 3 columns",
    ),
    "transfer tables lack a mixture column": (
        "score table",
        "transfer",
        lambda w, t: _two_tables(t, {k: v for k, v in RANK_TABLE.items() if k != "w_b"}, RANK_TABLE),
        "small.csv: no mixture column(s) ['w_b'] (present in",
    ),
    "transfer tables text in a metric column": (
        "score table",
        "transfer",
        lambda w, t: _two_tables(t, RANK_TABLE, {**RANK_TABLE, "loss": [1.0, 2.0, "abc"]}),
        "large.csv line 4: column loss is empty or not a finite number",
    ),
    "train mixtures that repeat": (
        "recipe value",
        "train",
        lambda w, t: _train_recipe(
            w, t, lambda tr: tr["train"].update(mixtures={"kind": "dirichlet", "alpha": 1e300, "count": 3})
        ),
        "mixture 1 is the same as mixture 0",
    ),
    "train budget drawing no example of a domain": (
        "recipe value",
        "train",
        lambda w, t: _train_recipe(
            w,
            t,
            lambda tr: tr["train"].update(
                steps=1,
                batch_tokens=1,
                mixtures={"kind": "list", "weights": [{"alpha": 0.05, "beta": 0.05, "gamma": 0.9}]},
            ),
        ),
        "would train on no example of",
    ),
    # issue 18: the command-line fuzzer (tests/test_fuzz_cli.py)
    "merge shard size zero": (
        "option",
        "merge",
        lambda w, t: [
            _recipe(w, t),
            "--weights",
            "alpha=0.3,beta=0.3,gamma=0.4",
            "--max-shard-size",
            "0",
            "--out",
            str(t / "out"),
        ],
        "--max-shard-size '0' is zero",
    ),
    "merge as an adapter of dense experts": (
        "option",
        "merge",
        lambda w, t: [
            _recipe(w, t),
            "--weights",
            "alpha=0.3,beta=0.3,gamma=0.4",
            "--as-adapter",
            "--out",
            str(t / "out"),
        ],
        "--as-adapter needs every expert to be a LoRA adapter",
    ),
    "rank table option in grid mode": (
        "option",
        "rank",
        lambda w, t: [*_grid(w, t, lambda rows: None), "--k", "2"],
        "--k: table-mode option(s) given with a recipe (grid mode)",
    ),
    "rank grid option in table mode": (
        "option",
        "rank",
        lambda w, t: _rank_tables(t, RANK_TABLE, RANK_TABLE, "--grid", str(t / "proxy.csv")),
        "--grid: grid-mode option(s) given without a recipe",
    ),
    "train run diverged by its last step": (
        "recipe value",
        "train",
        lambda w, t: _train_recipe(w, t, lambda tr: tr["train"].update(lr=1e308, steps=1)),
        "training alpha diverged (loss nan after its last step); lower train.lr",
    ),
    "train experts in one directory": (
        "recipe",
        "train",
        lambda w, t: _train_recipe(
            w, t, lambda tr: tr["model"]["experts"].update(beta=tr["model"]["experts"]["alpha"] + "/.")
        ),
        "model.experts.alpha and model.experts.beta are the same directory",
    ),
    "train expert inside another run": (
        "recipe",
        "train",
        lambda w, t: _train_recipe(
            w, t, lambda tr: tr["model"]["experts"].update(alpha=tr["model"]["experts"]["beta"] + "/alpha")
        ),
        "model.experts.alpha",
    ),
    # transfer
    "transfer tables share no mixture column": (
        "grid table",
        "transfer",
        lambda w, t: _two_tables(
            t,
            {"w_a": [1.0, 0.0], "w_b": [0.0, 1.0], "loss": [1.0, 2.0]},
            {"w_c": [1.0, 0.0], "w_d": [0.0, 1.0], "loss": [1.0, 2.0]},
        ),
        "mixture column",
    ),
    # diagnostics
    "diagnose recipe missing": (
        "recipe",
        "diagnose",
        lambda w, t: [str(t / "nope.yaml"), "--out", str(t / "out")],
        "nope.yaml does not exist",
    ),
    "diagnose too few points": (
        "option",
        "diagnose",
        lambda w, t: [_recipe(w, t), "--points", "2", "--out", str(t / "out")],
        "--points 2",
    ),
    "diagnose too many points": (
        "option",
        "diagnose",
        lambda w, t: [_recipe(w, t), "--points", "100000000000", "--out", str(t / "out")],
        "--points 100,000,000,000: at most 1,000",
    ),
    "diagnose sharded stack": (
        "recipe",
        "diagnose",
        lambda w, t: [_recipe(w, t), "model.shard=fsdp", "--out", str(t / "out")],
        "model.shard=none",
    ),
    "diagnose dev set named target": (
        "dev set",
        "diagnose",
        lambda w, t: [_recipe(w, t, lambda tree: tree["data"]["dev"][0].update(name="target"))],
        "'target'",
    ),
    "diagnose expert named like the base": (
        "recipe",
        "diagnose",
        lambda w, t: [
            _recipe(
                w, t, lambda tr: tr["model"]["experts"].update(__theta0__=tr["model"]["experts"].pop("gamma"))
            )
        ],
        "expert name '__theta0__' is reserved for the base model",
    ),
    "diagnose into the fit of other experts": (
        "output directory",
        "diagnose",
        lambda w, t: [
            _recipe(w, t),
            "--out",
            str(_finished_run(w, t, lambda m: m.update(weights={"alpha": 0.5, "delta": 0.5}))),
        ],
        "its weights name ['alpha', 'delta'] but the recipe's experts are ['alpha', 'beta', 'gamma']",
    ),
    # command lines
    "fit --resume with --restart": (
        "command line",
        "fit",
        lambda w, t: [_recipe(w, t), "--resume", "--restart"],
        "--resume and --restart contradict each other",
    ),
    "rank table mode without --truth": (
        "command line",
        "rank",
        lambda w, t: _rank_tables(t, RANK_TABLE, RANK_TABLE)[:2] + ["--out", str(t / "out")],
        "table mode needs both --proxy and --truth",
    ),
    "calibrate without a grid": (
        "command line",
        "calibrate",
        lambda w, t: [_recipe(w, t), "--out", str(t / "out")],
        "no grid of real runs: pass --grid GRID.csv or set calibrate.grid (or rank.grid)",
    ),
    "merge weight that is not a number": (
        "command line",
        "merge",
        lambda w, t: [_recipe(w, t), "--weights", "alpha=half,beta=0.5,gamma=0", "--out", str(t / "out")],
        "--weights: alpha='half' is not a number",
    ),
    "transfer metric named like the aggregate": (
        "score table",
        "transfer",
        lambda w, t: _two_tables(t, *[{**RANK_TABLE, "mean": [3.0, 1.0, 2.0]}] * 2),
        "a metric column is called 'mean', which names the aggregate here; rename it",
    ),
    # training
    "train data missing": (
        "training set",
        "train",
        lambda w, t: _train_recipe(w, t, lambda tr: tr["train"]["data"].update(alpha=str(t / "none.jsonl"))),
        "none.jsonl does not exist",
    ),
}


QUIET = ("fit", "merge", "rank", "calibrate", "train", "diagnose")  # the commands that take --quiet
NEEDS_LM_EVAL = {
    "lm-eval task scored on its test split",
    "lm-eval task whose data file is missing",
    "lm-eval term seeking its task's metric the wrong way",
}  # the extra [lm-eval] reads the task
NEEDS_STREAMING = {"export MDS directory with a corrupt zstd shard"}  # decompressed by streaming


def _doc_rows() -> dict[str, str]:
    """The documented table: each row's mistake and the message it shows."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if line.startswith("|") and len(cells) >= 4 and cells[0] not in ("input", "---"):
            rows[cells[1]] = cells[3].strip("`").replace("\\|", "|")
    return rows


def test_the_documented_table_lists_every_row_with_its_current_message():
    """Each row's documented line still holds what its test checks: a message changed in the code
    and not regenerated here (MERGEOPT_WRITE_DOCS=1, see below) fails."""
    assert len(MATRIX) >= 25
    documented = _doc_rows()
    assert list(documented) == list(MATRIX)
    stale = [row for row, (*_, culprit) in MATRIX.items() if culprit not in documented[row]]
    assert not stale, f"regenerate docs/reference/bad-input.md: {stale}"


@pytest.mark.parametrize("row", list(MATRIX))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(row, random_world, tmp_path, capsys):
    _, command, build, culprit = MATRIX[row]
    if row in NEEDS_LM_EVAL:
        pytest.importorskip("lm_eval")
    if row in NEEDS_STREAMING and importlib.util.find_spec("streaming") is None:
        pytest.skip("mosaicml-streaming is not installed")
    argv = build(random_world, tmp_path)
    capsys.readouterr()
    # a warning Python shows by default, or an "Exception ignored in ..." (a __del__ failing), is
    # more lines under the error in a terminal: pytest would have kept them out of capsys
    ignored, hook = [], sys.unraisablehook
    sys.unraisablehook = lambda raised: ignored.append(f"{raised.object!r}: {raised.exc_value!r}")
    try:
        with streaming_without_torchvision(), warnings.catch_warnings(record=True) as warned:
            warnings.resetwarnings()  # Python's default filters, as a terminal has them
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            code = run_cli(MAINS[command], [*argv, "--quiet"] if command in QUIET else argv)
            gc.collect()
    finally:
        sys.unraisablehook = hook
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert ignored == [], ignored
    assert [f"{w.category.__name__}: {w.message}" for w in warned] == []
    assert len(lines) == 1 and lines[0].startswith("mergeopt: error: "), err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("row", ["unknown recipe key", "NaN in an expert", "export negative weight"])
def test_debug_shows_the_traceback_and_a_subprocess_shows_none(row, random_world, tmp_path):
    _, command, build, culprit = MATRIX[row]
    argv = build(random_world, tmp_path)
    plain = run_module(command if command != "export" else "export", *argv)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and culprit in plain.stderr
    debug = run_module(command, *argv, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and culprit in debug.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not os.environ.get("MERGEOPT_WRITE_DOCS"), reason="regenerates docs/reference/bad-input.md on request"
)
def test_write_the_documented_table(random_world, tmp_path_factory, capsys):
    """MERGEOPT_WRITE_DOCS=1 pytest tests/test_bad_input.py -k documented_table: the table with real messages."""
    lines = [
        "# Bad input: what mergeopt says",
        "",
        "Every row is a test in tests/test_bad_input.py (a test checks that this table lists the same",
        "rows, each holding what its test checks): the command exits with code 2, prints this one line on",
        "stderr (paths shortened here), writes nothing, and shows a traceback only with `--debug`.",
        "Regenerate with",
        "`MERGEOPT_WRITE_DOCS=1 python -m pytest tests/test_bad_input.py -k documented_table`.",
        "",
        "| input | mistake | command | message |",
        "| --- | --- | --- | --- |",
    ]
    for row, (kind, command, build, _) in MATRIX.items():
        tmp = tmp_path_factory.mktemp("doc")
        argv = build(random_world, tmp)
        capsys.readouterr()
        with streaming_without_torchvision():
            run_cli(MAINS[command], [*argv, "--quiet"] if command in QUIET else argv)
        message = capsys.readouterr().err.strip()
        message = message.replace(str(tmp) + "/", "").replace(str(random_world["root"]) + "/", "")
        message = message.replace(str(REPO) + "/", "").replace(f"({REPO.parent})", "(/work)")  # where it ran
        message = message.replace("|", "\\|")
        lines.append(f"| {kind} | {row} | `{command}` | `{message}` |")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n", encoding="utf-8")
