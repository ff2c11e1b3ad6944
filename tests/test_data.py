"""Dev sets: which tokens are scored, exact error locations, a seeded split that keeps records with
their examples, batching."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mergeopt.errors import UserError
from mergeopt.objectives.data import (
    collate,
    evaluation_batches,
    load_dev_set,
    read_jsonl,
    read_records,
    tokenize,
    tokenize_records,
    training_batches,
)
from mergeopt.objectives.loss import target_loss
from mergeopt.worlds import toy
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


def test_text_records_score_every_token_after_the_first(tokenizer):
    ex = tokenize({"text": "hello"}, tokenizer, 64)
    assert ex.input_ids.tolist() == tokenizer("hello")["input_ids"]
    assert ex.scored.tolist() == [False] + [True] * 5  # BOS + 5 characters


def test_prompt_completion_scores_only_the_completion(tokenizer):
    ex = tokenize({"prompt": "3+4=", "completion": "7."}, tokenizer, 64)
    prompt_len = len(tokenizer("3+4=")["input_ids"])
    assert ex.input_ids.numel() == prompt_len + 2
    assert ex.scored.tolist() == [False] * prompt_len + [True, True]
    assert tokenizer.decode(ex.input_ids[ex.scored]) == "7."


def test_truncation_can_drop_an_example(tokenizer):
    assert tokenize({"prompt": "a" * 10, "completion": "b"}, tokenizer, 5) is None
    assert tokenize({"prompt": "a", "completion": "bcdef"}, tokenizer, 4).scored.sum() == 2


def test_records_truncation_drops_are_named_in_one_warning(tmp_path, tokenizer, capsys):
    """A record cut before its first scored token (a long prompt, a conversation whose assistant turn
    starts past data.max_length) leaves the set; one warning line names it, not silence."""
    records = [{"prompt": "1+1=", "completion": "2."}] * 3
    records.insert(1, {"prompt": "a" * 40, "completion": "b"})
    path = write_jsonl(tmp_path / "dev.jsonl", records)
    capsys.readouterr()
    dev = load_dev_set("d", path, 1.0, tokenizer, 16, 0.0, 0)
    assert len(dev.fit) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergeopt: warning: dev set "), err
    assert (
        "1 of 4 records left out: max_length=16 cuts them before their first scored token (record 2)"
        in err[0]
    )
    load_dev_set("d", write_jsonl(tmp_path / "ok.jsonl", records[:1] * 2), 1.0, tokenizer, 16, 0.0, 0)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "not valid JSON"),
        ('["a list"]', "a record must be a JSON object"),
        ('{"prompt": "only a prompt"}', "a record needs 'text', or 'prompt' and 'completion'"),
        ('{"text": 3}', "'text' must be a string"),
        ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "dev.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"dev\.jsonl:4: {re.escape(message)}"):
        read_jsonl(path)


def test_empty_and_missing_dev_sets(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_heldout_split_is_seeded_disjoint_and_sized(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"abc{i}"} for i in range(10)])
    a = load_dev_set("d", path, 1.0, tokenizer, 32, 0.3, seed=5)
    b = load_dev_set("d", path, 1.0, tokenizer, 32, 0.3, seed=5)
    c = load_dev_set("d", path, 1.0, tokenizer, 32, 0.3, seed=6)
    key = lambda exs: [tuple(e.input_ids.tolist()) for e in exs]  # noqa: E731
    assert key(a.heldout) == key(b.heldout) and len(a.heldout) == 3 and len(a.fit) == 7
    assert not set(key(a.heldout)) & set(key(a.fit))
    assert key(a.heldout) != key(c.heldout)


def test_too_small_to_hold_out(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "abc"}])
    with pytest.raises(UserError, match="too few to hold out"):
        load_dev_set("one", path, 1.0, tokenizer, 32, 0.2, seed=0)


def test_collate_pads_right_and_masks(tokenizer):
    short = tokenize({"text": "ab"}, tokenizer, 32)
    long = tokenize({"prompt": "abc", "completion": "de"}, tokenizer, 32)
    batch = collate([(0, short), (1, long)], pad_id=0)
    assert batch.input_ids.shape == (2, 6)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch.scored.sum().item() == 2 + 2
    assert batch.set_index.tolist() == [0, 1]


def test_training_batches_draw_batch_size_per_set_and_cover_each_epoch(tmp_path, tokenizer):
    sets = [
        load_dev_set(
            n,
            write_jsonl(tmp_path / f"{n}.jsonl", [{"text": f"{n}{i}"} for i in range(6)]),
            1.0,
            tokenizer,
            16,
            0.0,
            seed=0,
        )
        for n in ("ab", "cd")
    ]
    stream = training_batches(sets, [0, 1], batch_size=3, pad_id=0, seed=1)
    seen = {0: [], 1: []}
    for _ in range(2):  # two batches = one epoch of each 6-example set
        batch = next(stream)
        assert batch.set_index.tolist() == [0, 0, 0, 1, 1, 1]
        for row, s in zip(batch.input_ids, batch.set_index.tolist()):
            seen[s].append(tuple(row.tolist()))
    assert all(len(set(v)) == 6 for v in seen.values())
    first, second = (training_batches(sets, [0, 1], batch_size=3, pad_id=0, seed=1) for _ in range(2))
    for _ in range(3):
        assert torch.equal(next(first).input_ids, next(second).input_ids)


def test_evaluation_batches_visit_every_example_once(tmp_path, tokenizer):
    sets = [
        load_dev_set(
            "x",
            write_jsonl(tmp_path / "x.jsonl", [{"text": "a" * (i + 1)} for i in range(9)]),
            1.0,
            tokenizer,
            32,
            1 / 3,
            seed=0,
        )
    ]
    rows = sum(b.input_ids.shape[0] for b in evaluation_batches(sets, "all", 4, 0))
    held = sum(b.input_ids.shape[0] for b in evaluation_batches(sets, "heldout", 4, 0))
    assert rows == 9 and held == 3


def test_target_loss_is_the_weighted_mean_of_set_means():
    sums = torch.tensor([6.0, 10.0, 3.0])
    counts = torch.tensor([3.0, 2.0, 0.0])  # set 3 absent from this batch
    weights = torch.tensor([1.0, 3.0, 5.0])
    assert target_loss(sums, counts, weights).item() == pytest.approx((1 * 2.0 + 3 * 5.0) / 4)


CHOICE = '{"prompt": "2+2=", "choices": ["4.", "5."], "answer": 0}'


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "choices": "4.", "answer": 0}', "'choices' must be a list of at least 2 strings"),
        ('{"prompt": "p", "choices": ["4."], "answer": 0}', "'choices' must be a list of at least 2 strings"),
        ('{"prompt": "p", "choices": ["4.", ""], "answer": 0}', "choice 1 must be a non-empty string"),
        ('{"prompt": "p", "choices": ["4.", 5], "answer": 0}', "choice 1 must be a non-empty string"),
        ('{"prompt": "p", "choices": ["4.", "5."]}', "a record with 'choices' needs 'answer'"),
        (
            '{"prompt": "p", "choices": ["4.", "5."], "answer": 2}',
            "'answer' must be an index into 'choices' (0 to 1)",
        ),
        (
            '{"prompt": "p", "choices": ["4.", "5."], "answer": -1}',
            "'answer' must be an index into 'choices'",
        ),
        (
            '{"prompt": "p", "choices": ["4.", "5."], "answer": true}',
            "'answer' must be an index into 'choices'",
        ),
        (
            '{"prompt": "p", "choices": ["4.", "5."], "answer": "0"}',
            "'answer' must be an index into 'choices'",
        ),
        ('{"prompt": 3, "choices": ["4.", "5."], "answer": 0}', "'prompt' must be a string"),
    ],
)
def test_malformed_choice_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(CHOICE + "\n" + line + "\n")
    with pytest.raises(UserError, match=rf"mc\.jsonl:2: {re.escape(message)}"):
        read_jsonl(path)


def test_choice_record_keeps_its_fields(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"prompt": "2+2=", "choices": ["4.", "5."], "answer": 1, "id": 7}\n')
    assert read_jsonl(path) == [{"prompt": "2+2=", "choices": ["4.", "5."], "answer": 1}]


def test_choice_record_loss_scores_only_the_answer(tokenizer):
    record = {"prompt": "12+8=", "choices": ["2.", "20.", "200."], "answer": 1}
    ex = tokenize(record, tokenizer, 64)
    same = tokenize({"prompt": "12+8=", "completion": "20."}, tokenizer, 64)
    assert ex.input_ids.tolist() == same.input_ids.tolist() and ex.scored.tolist() == same.scored.tolist()
    assert ex.scored.sum().item() == 3 and tokenizer.decode(ex.input_ids[ex.scored]) == "20."
    assert ex.record is record


def test_records_stay_with_their_examples_through_the_split(tmp_path, tokenizer):
    records = [{"prompt": f"{i}+1=", "completion": f"{i + 1}."} for i in range(8)]
    records += [{"prompt": f"{i}?", "choices": ["a", "bb"], "answer": i % 2} for i in range(4)]
    records += [{"text": "x" * 40}]  # truncated to 16 tokens, still scored
    records += [{"prompt": "y" * 40, "completion": "z"}]  # truncated away at max_length 16
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    dev = load_dev_set("mixed", path, 1.0, tokenizer, 16, 0.25, seed=3)
    assert len(dev.fit) + len(dev.heldout) == len(records) - 1
    for ex in dev.all:
        again = tokenize(ex.record, tokenizer, 16)
        assert (
            again.input_ids.tolist() == ex.input_ids.tolist() and again.scored.tolist() == ex.scored.tolist()
        )
    kept = [json.dumps(ex.record, sort_keys=True) for ex in dev.all]
    assert sorted(kept) == sorted(json.dumps(r, sort_keys=True) for r in records[:-1])
    assert {json.dumps(ex.record) for ex in dev.fit}.isdisjoint(json.dumps(ex.record) for ex in dev.heldout)


def test_has_heldout_counts_only_the_sets_that_count():
    """The one definition of "the dev sets hold examples out" (early stopping, held-out losses and scores)."""
    from mergeopt.objectives.data import DevSet, has_heldout

    example = object()
    both = DevSet("a", 1.0, [example], [example])
    none_out = DevSet("b", 1.0, [example], [])
    assert has_heldout([both, both]) and not has_heldout([both, none_out])
    assert has_heldout([both, none_out], [1.0, 0.0])  # b has weight 0: it does not count
    assert not has_heldout([both, none_out], [0.5, 0.5])
    assert has_heldout([], [])  # nothing counts: vacuously true, as before


def test_a_dev_set_partly_of_unknown_tokens_is_loaded_with_one_warning(tmp_path, capsys):
    """From 10% of the scored tokens <unk> on, one warning line; from 50% on, a refusal (bad-input matrix)."""
    from mergeopt.objectives.data import load_dev_set
    from mergeopt.worlds import toy

    records = [{"prompt": "1+1=", "completion": "2 é"}] * 4  # 3 scored tokens, one of them <unk>
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    capsys.readouterr()
    dev = load_dev_set("d", path, 1.0, toy.build_tokenizer(), 48, 0.0, 0)
    assert len(dev.fit) == 4
    assert capsys.readouterr().err.splitlines() == [
        f"mergeopt: warning: dev set {path}: 33% of its scored tokens are the unknown token '<unk>'"
    ]


# ----------------------------------------------------------------------------- data kept by the datasets library

TABLES = {  # a table holds one layout: its columns
    "text": [{"text": "abc."}, {"text": "12+8=20."}] * 4,
    "prompt/completion": [
        {"prompt": "12+8=", "completion": "20."},
        {"prompt": "rev ab:", "completion": "ba."},
    ]
    * 4,
    "choices": [{"prompt": "1+1=", "choices": ["2.", "3."], "answer": 0}] * 8,
}


def _saved(records: list[dict], tmp_path, kind: str):
    """``records`` written as the datasets library writes them (one layout per column set)."""
    import datasets

    data = datasets.Dataset.from_list(records)
    if kind == "parquet":
        data.to_parquet(str(tmp_path / "dev.parquet"))
        return tmp_path / "dev.parquet"
    if kind == "csv":
        data.to_csv(str(tmp_path / "dev.csv"), index=False)
        return tmp_path / "dev.csv"
    if kind == "json-array":
        (tmp_path / "dev.json").write_text(json.dumps(records))
        return tmp_path / "dev.json"
    data.save_to_disk(str(tmp_path / "saved"))
    if kind == "disk":
        return tmp_path / "saved"
    return next((tmp_path / "saved").glob("*.arrow"))  # kind == "arrow"


@pytest.mark.parametrize(
    "kind,layout",
    [
        (kind, layout)
        for kind in ("parquet", "arrow", "disk", "json-array", "csv")
        for layout in sorted(TABLES)
        if (kind, layout) != ("csv", "choices")  # a CSV cell holds no list
    ],
)
def test_a_dev_set_kept_by_the_datasets_library_reads_as_its_jsonl(tmp_path, tokenizer, kind, layout):
    """The same records, the same examples and split."""
    records = TABLES[layout]
    jsonl = write_jsonl(tmp_path / "dev.jsonl", records)
    assert read_records(_saved(records, tmp_path, kind)) == read_records(jsonl) == records
    a = load_dev_set("a", jsonl, 1.0, tokenizer, 32, 0.25, 3)
    b = load_dev_set("a", _saved(records, tmp_path, kind), 1.0, tokenizer, 32, 0.25, 3)
    for part in ("fit", "heldout"):
        for x, y in zip(getattr(a, part), getattr(b, part), strict=True):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.scored, y.scored)


def test_conversations_in_parquet_read_as_in_jsonl(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2."}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "2+2="},
                {"role": "assistant", "content": "4."},
            ]
        },
    ]
    assert read_records(_saved(records, tmp_path, "parquet")) == records


def test_a_bad_record_in_a_table_is_named_by_its_number(tmp_path):
    path = _saved(
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}], tmp_path, "parquet"
    )
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: record 2: 'completion' is empty"):
        read_records(path)


def test_a_directory_that_is_not_a_saved_dataset_is_refused(tmp_path):
    (tmp_path / "dev").mkdir()
    with pytest.raises(UserError, match="is a directory but not a saved dataset"):
        read_records(tmp_path / "dev")


def test_csv_cells_are_read_as_the_text_they_hold(tmp_path):
    """Numbers and the words pandas takes for missing ("NA", "null") are completions like any text."""
    path = tmp_path / "dev.csv"
    path.write_text("prompt,completion\n2+2=,4\nIs it known?,NA\nvalue:,null\n")
    assert read_records(path) == [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "Is it known?", "completion": "NA"},
        {"prompt": "value:", "completion": "null"},
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "completion" "c"}', "not valid JSON (Expecting ':' delimiter)"),
        ('["a list"]', "a record must be a JSON object"),
    ],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_jsonl_file_the_datasets_library_cannot_read_is_named_by_its_line(tmp_path, line, message, suffix):
    """What an export counts goes through the datasets library; a JSON Lines file it cannot read is
    named by the file and the 1-based line, as a dev set's line is, and the library's log level is
    as it was before (it is silenced only while it reads)."""
    import datasets

    from mergeopt.objectives.data_files import load, source_of

    path = tmp_path / f"set{suffix}"
    path.write_text('{"prompt": "p", "completion": "c"}\n\n' + line + "\n")
    datasets.logging.set_verbosity_warning()
    with pytest.raises(UserError) as err:
        load(source_of(path), str(tmp_path / "cache"))
    assert str(err.value) == f"{path.resolve()}:3: {message}"
    assert datasets.logging.get_verbosity() == datasets.logging.WARNING


class _NoBosTokenizer:
    """A tokenizer that adds no BOS (SmolLM2's, Qwen's): one token per character."""

    unk_token = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_a_record_of_one_token_is_not_said_to_be_cut_by_max_length(capsys):
    """Under a tokenizer without BOS a one-token text (or a one-token completion after an empty
    prompt) has nothing to score at any length: a sequence's first token is never scored. The
    warning blamed max_length=256, which cuts nothing there; a set of such records only said
    'every example was truncated away'."""
    records = [{"text": "y"}, {"text": "a longer text"}, {"prompt": "", "completion": "z"}]
    capsys.readouterr()
    examples = tokenize_records(records, _NoBosTokenizer(), 256, "dev set d.jsonl")
    assert len(examples) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "max_length" not in err[0], err
    assert "2 of 3 records left out: record 1, 3 are a single token" in err[0], err
    with pytest.raises(UserError, match="no record has a token to score: record 1 is a single token"):
        tokenize_records(records[:1], _NoBosTokenizer(), 256, "dev set d.jsonl")
