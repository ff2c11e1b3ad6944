"""The SmolLM2 world: the converted safetensors base is the GGUF model exactly, and its data are valid."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeopt import worlds
from mergeopt.objectives.data import read_jsonl, tokenize
from mergeopt.worlds import smollm2


@pytest.fixture(scope="module")
def world(smollm2_world):
    return smollm2_world


def test_converted_base_gives_the_gguf_models_logits(world):
    folder, name = smollm2.gguf_location()
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    ids = tokenizer("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            converted(input_ids=ids).logits, reference(input_ids=ids).logits, atol=0, rtol=0
        )
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(folder, gguf_file=name).get_vocab()


def test_domains_have_valid_train_and_dev_sets(world):
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    meta = json.loads((world / worlds.MARKER).read_text())
    assert meta["domains"] == ["code", "prose", "math"]
    for domain in meta["domains"]:
        train = read_jsonl(world / "train" / f"{domain}.jsonl")
        dev = read_jsonl(world / "dev" / f"{domain}.jsonl")
        assert (len(train), len(dev)) == (smollm2.N_TRAIN, smollm2.N_DEV)
        examples = [tokenize(r, tokenizer, 128) for r in dev]
        assert all(ex is not None for ex in examples)
    math = read_jsonl(world / "dev" / "math.jsonl")[0]
    assert math["prompt"].endswith("Answer:") and math["completion"].strip().isdigit()


def test_world_is_deterministic(world, tmp_path):
    """The data are a function of the seed; the base is the GGUF's own weights (compared above, exactly)."""
    again = tmp_path
    meta = smollm2.write_data(again, seed=0, log=lambda _m: None)
    recorded = json.loads((world / worlds.MARKER).read_text())
    assert meta == {key: recorded[key] for key in meta}
    for split in ("train", "dev"):
        for domain in smollm2.DOMAINS:
            path = f"{split}/{domain}.jsonl"
            assert (again / path).read_text() == (world / path).read_text()
