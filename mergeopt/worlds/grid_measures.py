"""What each column of grid.csv measured, kept beside it, so a rank check compares like with like.

Why: grid.csv's losses and scores are measured on the records the recipe that wrote it read (its
dev sets, ``data.max_examples``, ``data.max_length``, the chat template) and with its terms'
settings. ``mergeopt rank``, ``calibrate`` and a fit's ``rank.grid`` score the proxy on the records
*their* recipe reads. When the two differ (``data.max_examples`` set for a quicker rank, a dev set
edited, a shorter ``max_length`` to fit memory), the proxy is ranked against numbers of other
records, and every statistic of the report looks as trustworthy as before.

``mergeopt train`` writes ``grid.measured.json`` beside ``grid.csv``: for each loss and score
column, the dev set's file digest, the records read, the settings that shape its tokens, a digest
of the tokens scored, and a term's settings. Each reader refuses a column measured otherwise, in one
line naming the difference: the file and the record count before any model is loaded
(:func:`check_measured_inputs`), the tokens once the dev sets are read (:func:`check_measured_tokens`).
A grid made elsewhere (or by an earlier mergeopt) has no such file and is not checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mergeopt.config import ObjectiveTerm, Recipe
from mergeopt.errors import UserError, warn
from mergeopt.objectives.data import DevSet, read_records
from mergeopt.objectives.objective import Objective
from mergeopt.objectives.term_scores import score_column
from mergeopt.runtime.files import write_json_atomic
from mergeopt.runtime.fingerprint import digest

KIND = "mergeopt grid measurements"  # the file's "kind": a JSON of another tool beside is not read
VERSION = 1
REMEDY = (
    "rerun mergeopt train with this recipe's data and objective sections (it measures the finished "
    "runs again, retraining none; a copy of its grid, such as calibrate's runs.csv, then takes the new "
    "rows and grid.measured.json), or use the settings it was measured with"
)
# how a term is weighed, named and read (its direction): not what it measures
TERM_IDENTITY = ("weight", "name", "label", "higher_is_better")
INCLUDE_DIGEST = "include_path_digest"  # an lm-eval term's local tasks, by content


def measured_path(grid: str | Path) -> Path:
    """``grid.measured.json`` beside ``grid.csv`` (``<stem>.measured.json`` for any other name)."""
    grid = Path(grid)
    return grid.with_name(f"{grid.stem}.measured.json")


def _unordered_digest(parts: Iterable[bytes]) -> str:
    """A digest of ``parts`` in no particular order (each hashed, the hashes sorted)."""
    return hashlib.sha256(b"".join(sorted(hashlib.sha256(p).digest() for p in parts))).hexdigest()


def token_digest(dev_set: DevSet) -> str:
    """A digest of every example's tokens and scored positions, in no particular order: grid.csv's
    losses are means over all of them (fit and held-out parts alike), so the split does not count."""
    return _unordered_digest(e.input_ids.numpy().tobytes() + e.scored.numpy().tobytes() for e in dev_set.all)


def read_capped(path: str | Path, max_examples: int | None) -> list | None:
    """The records of a dev set read under ``max_examples`` (None: not a local file)."""
    if not Path(path).exists():
        return None
    records = read_records(path)
    return records if max_examples is None else records[:max_examples]


def _records_digest(records: list) -> str:
    """A digest of ``records`` in no particular order and whatever their file's layout (another key
    order, spacing, format): the same records measure the same columns."""
    return _unordered_digest(json.dumps(r, sort_keys=True, default=str).encode() for r in records)


def records_digest(path: str | Path, max_examples: int | None) -> str | None:
    """:func:`_records_digest` of the records read under ``max_examples`` (None: not a local file)."""
    records = read_capped(path, max_examples)
    return None if records is None else _records_digest(records)


def _inputs(recipe: Recipe, name: str) -> dict:
    """What of dev set ``name`` can be known before it is read: its file and the settings."""
    spec = next(d for d in recipe.data.dev if d.name == name)
    template = recipe.data.chat_template
    return {
        "path": str(spec.path),
        "digest": digest(spec.path),
        "max_examples": recipe.data.max_examples,
        "max_length": recipe.data.max_length,
        "chat_template": digest(template) if template is not None else None,
    }


def term_settings(term: ObjectiveTerm) -> dict:
    """What a term's score depends on besides its records: its kind and the fields that kind reads;
    for an lm-eval term with local tasks, also a digest of everything in ``include_path`` (the
    task's YAML, its ``!function`` code, data kept there), which decides its score as its path
    does not."""
    settings = {k: v for k, v in term.record().items() if k not in TERM_IDENTITY}
    if term.kind == "lm_eval" and term.include_path is not None:
        settings[INCLUDE_DIGEST] = digest(term.include_path)
    return json.loads(json.dumps(settings))  # as the file holds them: a tuple is a list there


def _term_difference(now: dict, then: dict) -> str | None:
    """The first setting (sorted) in which a term's settings ``now`` differ from those a column
    was scored with, or None. An lm-eval ``include_path`` is compared by what it holds where the
    column's entry has its digest: the same tasks at another path (a grid moved with its task
    directory) are the same, the same path holding edited tasks is not."""
    by_contents = then.get(INCLUDE_DIGEST) is not None and now.get(INCLUDE_DIGEST) is not None
    for key in sorted(set(now) | set(then)):
        if key == INCLUDE_DIGEST and INCLUDE_DIGEST not in then:
            continue  # written before mergeopt recorded it: the path alone is compared
        if key == "include_path" and by_contents:
            continue
        if now.get(key) != then.get(key):
            return key
    return None


def grid_measures(recipe: Recipe, sets: Sequence[DevSet], terms: Sequence[ObjectiveTerm]) -> dict:
    """``{column: what it measured}`` for grid.csv's ``loss_<set>`` and ``score_<label>`` columns,
    from the (world-resolved) recipe that measured them and the dev sets it read."""
    by_name = {}
    for dev_set in sets:
        inputs = _inputs(recipe, dev_set.name)
        records = read_capped(inputs["path"], inputs["max_examples"])  # read once for both
        by_name[dev_set.name] = {
            **inputs,
            "records": None if records is None else len(records),
            "records_digest": None if records is None else _records_digest(records),
            "examples": len(dev_set.all),
            "tokens": token_digest(dev_set),
        }
    columns = {f"loss_{name}": {"dev_set": entry} for name, entry in by_name.items()}
    for term in terms:
        entry = {"term": term_settings(term)}
        if term.kind != "lm_eval":  # lm_eval scores its task's own documents
            entry["dev_set"] = by_name[term.dev]
        columns[score_column(term)] = entry
    return columns


def write_measures(
    grid: Path, columns: Mapping[str, dict], kept: Sequence[str], earlier: dict | None
) -> Path:
    """``grid.measured.json`` for a grid.csv just written: ``columns``, plus the entries of an
    earlier file for the score columns carried over (``kept``), measured then."""
    carried = {c: earlier[c] for c in kept if earlier is not None and c in earlier}
    return write_json_atomic(
        measured_path(grid), {"kind": KIND, "version": VERSION, "columns": {**columns, **carried}}
    )


def read_measures(grid: str | Path, say: bool = True) -> dict | None:
    """The columns' entries of the file beside ``grid``; None without one (a grid made elsewhere).
    A file that is not one is said in a warning and not used; so is a missing one beside a grid
    whose runs mergeopt train trained (a grid.csv copied or renamed without it). ``say``: False for
    a second reading in the same command (each warning once) and for train's own earlier grid."""
    path = measured_path(grid)
    if not path.is_file():
        runs = _trained_here(grid) if say else []
        if runs:
            # train.output_dir/mixtures/NNN first: an expert (a vertex row) lies at model.experts'
            # path, which may be another train's (a second round reusing the first round's experts)
            ordered = sorted(runs, key=lambda run: run.parent.name != "mixtures")
            sources = (run.parent.parent / "grid.measured.json" for run in ordered)
            source = next((s for s in sources if s.is_file()), None)
            copy = (
                f"copy {source}, written with its runs, to {path}"
                if source is not None
                else f"copy the grid.measured.json that mergeopt train wrote beside its runs' grid.csv to "
                f"{path} (mergeopt train with that recipe writes it again, retraining no run)"
            )
            warn(
                f"{grid}: its runs were trained by mergeopt train, but no {path.name} is beside it, "
                f"so whether its columns were measured on this recipe's records is not checked ({copy})"
            )
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if say:
            warn(f"{path}: not readable ({err}); what {Path(grid).name}'s columns measured is not checked")
        return None
    if not isinstance(content, dict) or content.get("kind") != KIND:
        return None  # not mergeopt's
    columns = content.get("columns")
    if content.get("version") != VERSION or not isinstance(columns, dict):
        if say:
            warn(
                f"{path}: not a version {VERSION} file; what {Path(grid).name}'s columns measured is "
                "not checked"
            )
        return None
    return {c: e for c, e in columns.items() if isinstance(e, dict)}


def _trained_here(grid: str | Path) -> list[Path]:
    """The runs of mergeopt train on this disk (their directories, with run.json) that the rows of
    ``grid`` name, read as :func:`mergeopt.worlds.run_records.grid_run_records` reads the path
    column."""
    from mergeopt.runtime.exact_csv import read_csv
    from mergeopt.worlds.run_records import RUN_MARKER

    try:
        table = read_csv(grid)
    except (OSError, ValueError):
        return []
    if "path" not in table.columns:
        return []
    runs = []
    for value in table["path"]:
        if isinstance(value, str) and value.strip():
            given = Path(value)
            runs += [run for run in (given, Path(grid).parent / given) if (run / RUN_MARKER).is_file()][:1]
    return runs


def _checked(grid, objective: Objective, say: bool = True):
    """(column, its entry, the dev set it measured or None, its term or None) for each column the
    objective compares with the proxy that the file beside ``grid`` describes."""
    measured = read_measures(grid, say)
    if not measured:
        return []
    found = []
    for name in objective.dev_names:
        entry = measured.get(f"loss_{name}")
        if isinstance(entry, dict) and isinstance(entry.get("dev_set"), dict):
            found.append((f"loss_{name}", entry, name, None))
    for term in objective.metric_terms:
        entry = measured.get(score_column(term))
        if isinstance(entry, dict):
            dev = term.dev if isinstance(entry.get("dev_set"), dict) and term.kind != "lm_eval" else None
            found.append((score_column(term), entry, dev, term))
    return found


def check_measured_inputs(grid: str | Path, recipe: Recipe, objective: Objective, also: str = "") -> None:
    """Before any model is loaded: each column the proxy is compared with was measured with this
    recipe's term settings, on the same dev set file and as many of its records. ``recipe`` is
    world-resolved (its dev sets are files); ``also`` ends each refusal (another way out)."""
    try:
        _check_inputs(grid, recipe, objective)
    except UserError as err:
        raise UserError(f"{err}{also}") from None


def _check_inputs(grid: str | Path, recipe: Recipe, objective: Objective) -> None:
    for column, entry, dev, term in _checked(grid, objective):
        if term is not None and isinstance(entry.get("term"), dict):
            now, then = term_settings(term), entry["term"]
            key = _term_difference(now, then)
            if key == INCLUDE_DIGEST and now.get(INCLUDE_DIGEST) is None:  # nothing there to compare
                raise UserError(
                    f"objective term {term.label!r}: its include_path {now.get('include_path')} does not "
                    f"exist (the lm-eval task files {grid}'s {column} was scored with)"
                )
            if key == INCLUDE_DIGEST:
                raise UserError(
                    f"{grid}: its {column} was scored with other lm-eval task files than objective "
                    f"term {term.label!r}'s include_path {now.get('include_path')} holds now (a task's "
                    f"YAML, code or data there was edited): {REMEDY}"
                )
            if key is not None:
                raise UserError(
                    f"{grid}: its {column} was scored with {key} {_shown(then.get(key))}, and "
                    f"objective term {term.label!r} has {_shown(now.get(key))} now: {REMEDY}"
                )
        if dev is None:
            continue
        then, now = entry["dev_set"], _inputs(recipe, dev)
        if now["digest"] is None and then.get("digest") is not None:
            continue  # not on this disk (a mistyped path): the dev set's loader says so, not 'differ'
        same_file = then.get("digest") == now["digest"]
        if same_file and then.get("max_examples") == now["max_examples"]:
            continue  # the records are read only where the file or the cap differ
        records = read_capped(now["path"], now["max_examples"])  # read once for both checks below
        known = records is not None and then.get("records_digest") is not None  # None: not a local file
        if known and then["records_digest"] == _records_digest(records):
            continue  # the very records: another copy, layout or order of the file, or another cap
        if not same_file:
            raise UserError(
                f"{grid}: its {column} was measured on another file than dev set {dev!r} ({now['path']}; "
                f"it was {then.get('path')}, whose contents differ): {REMEDY}"
            )
        if then.get("max_examples") != now["max_examples"]:
            read = None if records is None else len(records)
            if read is None or read != then.get("records"):
                raise UserError(
                    f"{grid}: its {column} was measured on {_records(then.get('records'))} of dev set "
                    f"{dev!r} (data.max_examples {_shown(then.get('max_examples'))}), and this recipe "
                    f"reads {_records(read)} (data.max_examples {_shown(now['max_examples'])}): {REMEDY}"
                )


def check_measured_tokens(
    grid: str | Path, recipe: Recipe, objective: Objective, sets: Sequence[DevSet], also: str = ""
) -> None:
    """Once the dev sets are read (``sets``, as the proxy scores them): each column the proxy is
    compared with was measured on the very tokens, naming what changed them (``data.max_length``,
    the chat template, or else the tokenizer); ``also`` ends a refusal."""
    by_name = {s.name: s for s in sets}
    for column, entry, dev, _ in _checked(grid, objective, say=False):  # said by check_measured_inputs
        if dev is None or dev not in by_name:
            continue
        then = entry["dev_set"]
        if then.get("tokens") == token_digest(by_name[dev]):
            continue
        now = _inputs(recipe, dev)
        if then.get("max_length") != now["max_length"]:
            cause = f"data.max_length {_shown(now['max_length'])} now, {_shown(then.get('max_length'))} then"
        elif then.get("chat_template") != now["chat_template"]:
            cause = "another data.chat_template"
        else:
            cause = "another tokenizer: is model.base the base its runs were trained from?"
        remedy = REMEDY
        if cause == "another data.chat_template":  # the runs were trained with it: train refuses another
            remedy = "use the chat template its runs were trained and measured with"
        raise UserError(
            f"{grid}: its {column} was measured on other tokens of dev set {dev!r} than this recipe "
            f"scores ({cause}): {remedy}{also}"
        )


def _records(count) -> str:
    return "an unknown number of records" if count is None else f"{count} records"


def _shown(value) -> str:
    return "null" if value is None else json.dumps(value)
