"""Loading never executes code: hostile pickles, YAML tags and remote modelling code are refused.

Each hostile input would create a marker file if its payload ran; the tests check the one-line
error and that the marker never appears.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
import yaml

from mergeopt.config import load_recipe
from mergeopt.errors import UserError, run_cli
from mergeopt.fit import main as fit_main
from mergeopt.runtime.resume import CHECKPOINT_DIR, GRADIENT_STATE, RunState
from tests.conftest import recipe_tree


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_pickle(path, marker) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, handle)


def _recipe(world, tmp_path, **model) -> str:
    tree = recipe_tree(world, tmp_path / "out")
    tree["model"].update(model)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_hostile_pickle_checkpoint_is_refused_even_with_allow_pickle(random_world, tmp_path, capsys):
    expert = tmp_path / "expert"
    shutil.copytree(random_world["experts"]["alpha"], expert)
    (expert / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _hostile_pickle(expert / "pytorch_model.bin", marker)
    recipe = _recipe(random_world, tmp_path, experts={**random_world["experts"], "alpha": str(expert)})
    code = run_cli(fit_main, [recipe, "model.allow_pickle=true", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_hostile_resume_state_is_refused(tmp_path):
    state = RunState(tmp_path, {"seed": 0})
    state.start()
    marker = tmp_path / "pwned"
    _hostile_pickle(tmp_path / CHECKPOINT_DIR / GRADIENT_STATE, marker)
    with pytest.raises(UserError, match="unreadable checkpoint"):
        state.load_gradient()
    assert not marker.exists()


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "recipe.yaml"
    path.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(UserError):
        load_recipe(tmp_path / "recipe.yaml", [f'seed=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


def test_remote_modelling_code_does_not_run_without_trust_remote_code(random_world, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(random_world["base"], base)
    marker = tmp_path / "pwned"
    (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (base / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((base / "config.json").read_text())
    config.update(
        model_type="evil",
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilModel",
        },
    )
    (base / "config.json").write_text(json.dumps(config))
    code = run_cli(fit_main, [_recipe(random_world, tmp_path, base=str(base)), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_weights_only_state_loads_what_it_saved(tmp_path):
    """The resume state is plain tensors and numbers: weights_only loading reads it back exactly."""
    state = RunState(tmp_path, {"seed": 0})
    state.start()
    saved = {
        "z": torch.randn(3, dtype=torch.float64),
        "trace": [{"step": 0, "loss": float("nan")}],
        "next_step": 1,
    }
    state.save_gradient(saved)
    loaded = state.load_gradient()
    assert torch.equal(loaded["z"], saved["z"]) and loaded["next_step"] == 1
    assert loaded["trace"][0]["step"] == 0
