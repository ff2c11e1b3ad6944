"""Checkpoints of a fit in progress, so a preempted or killed run continues where it stopped.

Fits on large models take hours on shared clusters. What a fit must not lose is small: for the
gradient strategy the K logits, Adam's state, the step, the early-stopping bookkeeping and the
trace; for the zero-order strategies the log of real evaluations, each of which may have cost
minutes. ``RUN/checkpoint/`` holds them:

* ``meta.json``: the resolved recipe the checkpoint belongs to (a run whose recipe changed is
  refused, naming the first key that differs, instead of silently mixing two runs) and a
  fingerprint of every input it read (:mod:`mergeopt.runtime.fingerprint`: a dev set edited or an
  expert retrained since is refused too, naming the first changed file);
* ``gradient.pt``: the gradient strategy's state, rewritten atomically every
  ``optim.checkpoint_every`` steps (``torch.save``; read back with ``weights_only=True``, so
  loading it can execute nothing);
* ``evaluations.jsonl``: one line per real evaluation, appended and fsynced as it happens. On
  resume the strategy runs again from its seed and the logged scores answer its requests in order
  (:class:`mergeopt.search.evaluator.Evaluator` replays them), so it takes the same decisions and
  writes the same evaluation log without evaluating anything twice; a torn last line from a kill
  is dropped;
* ``proxy_evaluations.jsonl``: with ``rank.grid`` set, the rank check's evaluations of the merged
  proxy at each grid mixture, journaled and replayed the same way. ``mergeopt rank`` in grid mode
  keeps the same journal in ``OUT/rank_checkpoint/``, its own directory;
* ``tracking.json``: the run ids of the experiment trackers (logging.backends), so a resumed fit
  logs into the same MLflow and W&B runs (:mod:`mergeopt.reporting.tracking`).

SIGINT and SIGTERM do not kill a fit: :mod:`mergeopt.runtime.interrupts` turns them into a flag
that the loops check between steps or evaluations; the state is saved here and
:class:`~mergeopt.errors.Interrupted` ends the run with a message saying how to continue. A second
signal stops at once (the last checkpoint remains).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from mergeopt.errors import UserError
from mergeopt.runtime import distributed
from mergeopt.runtime.files import write_bytes_atomic, write_json_atomic
from mergeopt.runtime.fingerprint import first_changed

CHECKPOINT_DIR = "checkpoint"
META = "meta.json"
GRADIENT_STATE = "gradient.pt"
EVALUATIONS = "evaluations.jsonl"
PROXY_EVALUATIONS = "proxy_evaluations.jsonl"  # the rank check's grid (mergeopt.evaluation.proxy)
RANK_CHECKPOINT_DIR = "rank_checkpoint"  # `mergeopt rank RECIPE`'s own state, beside a fit's
CALIBRATE_CHECKPOINT_DIR = "calibrate_checkpoint"  # the proxy's evaluations, kept for the next round
TRACKING = "tracking.json"
UNSET = object()

# what a resumed run may change: how it runs, not what it computes. A job preempted and restarted
# on a smaller GPU lowers the evaluation batch or turns on activation checkpointing (recomputation
# gives the same numbers; another evaluation batch sums the same terms in another order, so the
# losses may move in their last bits), and may land on another device.
CHANGEABLE_ON_RESUME = (
    "device",
    "optim.eval_batch_size",
    "optim.activation_checkpointing",
    "optim.checkpoint_every",
)


def _without(tree: dict, dotted: Sequence[str]) -> dict:
    """A copy of ``tree`` without the ``dotted`` keys (top-level or one section deep)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for key in dotted:
        head, _, rest = key.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head].pop(rest, None)
        elif not rest:
            out.pop(head, None)
    return out


def _first_difference(a, b, prefix: str = "") -> tuple[str, object, object] | None:
    """``(dotted key, value in a, value in b)`` of the first difference between two nested trees
    of mappings and lists (None if equal); a key one side lacks has the value :data:`UNSET`."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{prefix}{key}", a.get(key, UNSET), b.get(key, UNSET)
            found = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{prefix}{i}.")
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip(".") or "(the recipe)", a, b)


def _relocated(saved, now, saved_inputs: dict, inputs: dict, moved: dict):
    """``saved`` (a checkpoint's recipe tree) with each input path that only moved replaced by its
    new value in ``now``: a string that differs and names a recorded input (``saved_inputs``) on
    one side and an input of this run (``inputs``) on the other, with the same content or with its
    old path gone (moved and edited: the inputs' check then names it). ``moved`` collects old: new.

    A state copied with its inputs to other paths (another cluster's disk) would otherwise be
    refused as another recipe's, and rerunning with that recipe is impossible once the old paths
    are gone: --restart would evaluate every mixture again."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return {
            k: _relocated(v, now[k], saved_inputs, inputs, moved) if k in now else v for k, v in saved.items()
        }
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [_relocated(a, b, saved_inputs, inputs, moved) for a, b in zip(saved, now)]
    if not (isinstance(saved, str) and isinstance(now, str)) or saved == now:
        return saved
    if saved in saved_inputs and now in inputs and now not in saved_inputs:
        if saved_inputs[saved] == inputs[now] or not Path(saved).exists():
            moved[saved] = now
            return now
    elif saved not in saved_inputs and _moved_along(saved, now):
        return now  # a path read for no number of the state (rank.grid, train.output_dir)
    return saved


def _moved_unnamed(saved_inputs: dict, inputs: dict, moved: dict) -> None:
    """Add to ``moved`` each recorded input that no recipe string names, whose old path is gone
    and whose content an input of this run has: a built-in world's files, which the recipe names
    as ``tiny://...`` and the state records where the cache held them, follow a cache moved with
    the run (``$MERGEOPT_CACHE`` on another disk). A world built again elsewhere differs in its
    bits and stays refused."""
    by_content = {value: path for path, value in inputs.items() if path not in saved_inputs}
    for path, value in saved_inputs.items():
        if path not in moved and path not in inputs and value in by_content and not Path(path).exists():
            moved[path] = by_content[value]


def moved_by_name(saved, now):
    """``saved`` (a complete run's recipe tree) with each path that moved along with the run
    replaced by its new value in ``now``: a path of the same name whose old place is gone and whose
    new one is here. A complete run records no fingerprints of its inputs to compare contents by,
    so this is :func:`_relocated`'s rule for paths no fingerprint covers."""
    return _relocated(saved, now, {}, {}, {})


def _moved_along(old: str, new: str) -> bool:
    """``old`` is gone and ``new``, of the same name, is here: a grid or directory the recipe names,
    copied with the run to another disk."""
    if "/" not in old or "/" not in new or Path(old).name != Path(new).name:
        return False
    return not Path(old).exists() and Path(new).exists()


def _value_at(tree: dict, dotted: str) -> object:
    """The value of ``tree`` at the dotted key, or :data:`UNSET` where absent."""
    node = tree
    for part in dotted.split("."):
        node = node.get(part, UNSET) if isinstance(node, dict) else UNSET
    return node


def what_it_computes(tree: dict) -> dict:
    """A recipe tree without where the run writes and which trackers watch it (``output_dir``,
    ``logging``): what decides the run's numbers, compared by resume and by a rerun's check."""
    return {k: v for k, v in tree.items() if k not in ("output_dir", "logging")}


def _shown(value: object) -> str:
    """A recipe value as the message shows it: unset, or its JSON text cut to a readable length."""
    if value is UNSET:
        return "unset"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RunState:
    """The checkpoint directory of one run (RUN/checkpoint), tied to its resolved recipe.

    ``name`` is the directory's name: ``checkpoint`` for a fit, ``rank_checkpoint`` for
    ``mergeopt rank`` in grid mode, so neither touches the other's state in a shared output_dir.
    """

    def __init__(
        self,
        output_dir: str | Path,
        recipe_tree: dict,
        name: str = CHECKPOINT_DIR,
        inputs: dict[str, str] | None = None,
        keyed_by: Callable[[dict], dict] = what_it_computes,
    ):
        self.dir = Path(output_dir) / name
        self.inputs = inputs  # {path: digest} of what the run reads (None: not checked)
        # the part of the recipe the state depends on; applied to a saved recipe too, so a state
        # saved by a version that kept more of the recipe is compared on the same part
        self._keyed_by = keyed_by
        self.recipe = keyed_by(recipe_tree)
        self._on_first_write = None  # set by start_lazily: runs before the first byte is written
        self._tracking: dict | None = None  # tracking.json, held until a lazily started state starts
        self.changed: list[str] = []  # keys of CHANGEABLE_ON_RESUME this run changed, as "key new (was old)"

    # -- lifecycle ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.dir / META).is_file()

    def check_matches(self) -> None:
        """Refuse a checkpoint written by a different recipe, naming the first key that differs."""
        try:
            meta = json.loads((self.dir / META).read_text(encoding="utf-8"))
            saved, saved_inputs = self._keyed_by(meta["recipe"]), meta.get("inputs") or {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{self.dir / META}: unreadable checkpoint; delete {self.dir} or pass --restart"
            ) from None
        if self.inputs is not None and isinstance(saved_inputs, dict):  # inputs copied elsewhere
            moved: dict[str, str] = {}
            saved = _relocated(saved, self.recipe, saved_inputs, self.inputs, moved)
            _moved_unnamed(saved_inputs, self.inputs, moved)
            saved_inputs = {moved.get(path, path): value for path, value in saved_inputs.items()}
        difference = _first_difference(
            _without(saved, CHANGEABLE_ON_RESUME), _without(self.recipe, CHANGEABLE_ON_RESUME)
        )
        self.changed = [
            f"{key} {_shown(now)} (was {_shown(was)})"
            for key in CHANGEABLE_ON_RESUME
            if (was := _value_at(saved, key)) != (now := _value_at(self.recipe, key))
        ]
        # torchrun's number of processes may change too (a requeued job on fewer GPUs): another
        # split of each batch sums the same terms in another order, so it is said, as the keys are
        processes, was = distributed.process_rank_and_size()[1], meta.get("processes")
        if isinstance(was, int) and was != processes:
            self.changed.append(f"{processes} process{'es' if processes != 1 else ''} (was {was})")
        if difference is not None:
            key, was, now = difference
            raise UserError(
                f"{self.dir} belongs to a run with another recipe ({key} differs: {_shown(was)} in the "
                f"checkpoint, {_shown(now)} now); rerun with that recipe, pass --restart to start over, "
                "or use another output_dir"
            )
        changed = first_changed(saved_inputs) if self.inputs is not None else None
        if changed is not None:
            raise UserError(
                f"{self.dir} belongs to a run that read other data: {changed} changed since; "
                "restore it, pass --restart to start over on the new data, or use another output_dir"
            )

    def start(self) -> None:
        """A fresh checkpoint for this recipe (whatever was there is removed)."""
        self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"recipe": self.recipe, **({} if self.inputs is None else {"inputs": self.inputs})}
        meta["processes"] = distributed.process_rank_and_size()[1]  # torchrun's, said if a resume changes it
        write_json_atomic(self.dir / META, meta)
        if self._tracking is not None:
            write_json_atomic(self.dir / TRACKING, self._tracking)

    def start_lazily(self, before=None) -> None:
        """Start fresh at the first save, after calling ``before``: a run that stops on a user error
        before saving anything leaves the output directory as it found it. Until then the state
        reads as empty, so a ``--restart`` never reads what the old run left there."""
        self._on_first_write = before or (lambda: None)

    @property
    def _fresh(self) -> bool:
        """Started lazily and not saved yet: whatever is on disk belongs to an earlier run."""
        return self._on_first_write is not None

    def _ensure_started(self) -> None:
        if self._on_first_write is not None:
            before, self._on_first_write = self._on_first_write, None
            before()
            self.start()

    def clear(self) -> None:
        """Remove the checkpoint directory, with any temporary file a kill left mid-save."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def discard(self) -> None:
        """Undo this run's state after a user error: removed if this run saved any. A state started
        lazily and not saved yet is an earlier run's (what a ``--restart`` would have replaced) and
        stays: a restart refused for a mistake keeps the journal of hours of evaluations."""
        if not self._fresh:
            self.clear()

    # -- gradient state -------------------------------------------------------------------------
    def save_gradient(self, state: dict) -> None:
        import io

        self._ensure_started()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.dir / GRADIENT_STATE, buffer.getvalue())

    def load_gradient(self) -> dict | None:
        path = self.dir / GRADIENT_STATE
        if self._fresh or not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt file: say which, do not guess
            raise UserError(f"{path}: unreadable checkpoint ({type(err).__name__}); pass --restart") from None

    # -- evaluation log -------------------------------------------------------------------------
    def append_evaluation(self, entry: dict, journal: str = EVALUATIONS) -> None:
        """Append one real evaluation and fsync: after a kill, every logged line is complete but the last.

        ``journal`` names the log: the search's (``evaluations.jsonl``) or the rank check's grid
        (``proxy_evaluations.jsonl``).
        """
        self._ensure_started()
        line = json.dumps(entry, allow_nan=False) + "\n"
        with open(self.dir / journal, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_evaluations(self, journal: str = EVALUATIONS) -> list[dict]:
        path = self.dir / journal
        if self._fresh or not path.is_file():
            return []
        entries, lines = [], path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the line a kill tore; nothing after it was written
                break
        if len(entries) < len(lines):  # drop the torn line before anything is appended after it
            text = "".join(json.dumps(e, allow_nan=False) + "\n" for e in entries)
            write_bytes_atomic(path, text.encode("utf-8"))
        return entries

    # -- experiment trackers --------------------------------------------------------------------
    def save_tracking(self, run_ids: dict, lazily: bool = False) -> None:
        """The trackers' run ids (backend -> id), written when they open, so a resume reuses them.
        ``lazily``: a state started lazily and not saved yet writes them with its first save (a fit
        that stops before it leaves nothing behind). So does one that an earlier run's state lies
        under (``--restart``), lazily or not: writing them would start this run's state, removing
        the earlier one before this run saved anything, and a restart refused for a mistake would
        lose it (:meth:`discard`)."""
        if self._fresh and (lazily or self.exists()):
            self._tracking = run_ids
            return
        self._ensure_started()
        write_json_atomic(self.dir / TRACKING, run_ids)

    def load_tracking(self) -> dict:
        """The run ids a previous attempt of this run saved ({} when none, or unreadable: new runs)."""
        if self._fresh:
            return {}
        try:
            ids = json.loads((self.dir / TRACKING).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return ids if isinstance(ids, dict) else {}


def open_state(
    output_dir: str | Path,
    tree: dict,
    resume: str,
    name: str = CHECKPOINT_DIR,
    inputs: dict[str, str] | None = None,
    keyed_by: Callable[[dict], dict] = what_it_computes,
) -> tuple[RunState, bool]:
    """The run's state in ``output_dir/name`` and whether this run resumes it (``resume``: auto,
    require or restart). ``inputs``: the fingerprints of what it reads
    (:func:`mergeopt.runtime.fingerprint.input_fingerprints`); ``keyed_by``: the part of the
    recipe's ``tree`` the state depends on. Under torchrun every rank must see the same answer."""
    checkpoint = RunState(output_dir, tree, name, inputs, keyed_by)
    if resume not in ("auto", "require", "restart"):
        raise ValueError(f"resume must be auto, require or restart, not {resume!r}")
    found = distributed.all_gather_objects(resume != "restart" and checkpoint.exists())
    if any(found) and not all(found):  # ranks on other nodes see another output_dir
        missing = ", ".join(str(r) for r, seen in enumerate(found) if not seen)
        raise UserError(
            f"{checkpoint.dir}: the checkpoint is seen by some ranks and not by rank(s) {missing}: "
            "under torchrun over several nodes, output_dir must be on a filesystem every node mounts"
        )
    if not found[0]:
        if resume == "require":
            raise UserError(f"--resume: {checkpoint.dir} holds no checkpoint to resume")
        return checkpoint, False
    checkpoint.check_matches()
    return checkpoint, True


def recipe_tree(recipe) -> dict:
    """The resolved recipe as plain data (what meta.json stores and compares)."""
    return yaml.safe_load(yaml.safe_dump(recipe.model_dump(mode="json")))
