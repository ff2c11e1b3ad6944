"""The export tests' world: three JSONL domains of known lengths, a character-level tokenizer, a
mixture.json, and the CLI run in process. Shared by every ``tests/test_export*.py`` module, so that
each framework's proof reads the same numbers.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import yaml

from mergeopt.errors import run_cli
from mergeopt.export.command import main
from mergeopt.export.token_stats import DomainStats
from mergeopt.worlds import toy

# token shares as fitted; every record of a domain has a known character length (+1 for BOS)
WEIGHTS = {"a": 0.2, "b": 0.5, "c": 0.3}
SIZES = {"a": 1500, "b": 1200, "c": 2400}
LENGTHS = {"a": (4, 8), "b": (20, 30), "c": (9, 11)}  # alternating prompt+completion characters


def records(name: str, size: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(size):
        total = LENGTHS[name][i % 2]
        split = rng.randint(1, total - 1)
        text = "".join(rng.choice("abcdefgh") for _ in range(total))
        out.append({"prompt": text[:split], "completion": text[split:], "domain": name, "index": i})
    return out


def mean_tokens(name: str) -> float:
    return 1 + sum(LENGTHS[name]) / 2  # BOS + characters; sizes are even


def build_world(root: Path) -> dict:
    """Three JSONL domains, a character-level tokenizer, and a mixture.json of WEIGHTS under ``root``."""
    tokenizer_dir = root / "tokenizer"
    toy.build_tokenizer().save_pretrained(tokenizer_dir)
    rng = random.Random(0)
    paths = {}
    for name, size in SIZES.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records(name, size, rng)))
    mixture = write_run(root / "run", WEIGHTS)
    return {"root": root, "tokenizer": str(tokenizer_dir), "paths": paths, "mixture": mixture}


def write_run(
    root: Path, weights: dict, method: dict | None = None, recipe: dict | None = None, **extra
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    mixture = {
        "status": "complete",
        "weights": weights,
        "strategy": "gradient",
        "method": method or {"name": "linear", "scale": 1.0},
        "seed": 0,
        **extra,
    }
    (root / "mixture.json").write_text(json.dumps(mixture))
    if recipe is not None:
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "mixture.json"


def export(world: dict, fmt: str, tmp_path: Path, *extra: str, datasets: bool = True) -> str:
    """Run the CLI in process; return the written file's text."""
    out = tmp_path / f"out-{fmt}"
    args = [str(world["mixture"]), "--to", fmt, "--tokenizer", world["tokenizer"], "--out", str(out)]
    if datasets:
        args += ["--datasets", *(f"{n}={p}" for n, p in world["paths"].items())]
    assert run_cli(main, [*args, *extra]) == 0
    return out.read_text()


def expected_sample_shares(added: int = 0) -> dict[str, float]:
    """The sample shares that give WEIGHTS of the tokens trained, each sample ``added`` more than
    mergeopt counts (-1: LLaMA-Factory's empty template writes no BOS; see measured_stats)."""
    raw = {n: WEIGHTS[n] / (mean_tokens(n) + added) for n in WEIGHTS}
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()}


def yaml_body(text: str):
    return yaml.safe_load(text)


def measured_stats(added: int = 0) -> dict[str, DomainStats]:
    """What ``mergeopt export`` measures of the world's datasets, known by hand; with ``added``, the
    tokens a trainer trains on that adds that many special tokens to each sample (TRL, axolotl and
    torchtune add an EOS to each of the world's prompt/completion or text records)."""
    return {n: DomainStats(SIZES[n], int(SIZES[n] * (mean_tokens(n) + added)), added) for n in WEIGHTS}


# BOS, then the messages' contents: a conversation counts the tokens of its prompt/completion record
CONCAT = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def chat_world(world, tmp_path, layout: str) -> dict:
    """The world with a chat template, its records rewritten as conversations in ``layout``."""
    tokenizer = tmp_path / "chat-tokenizer"
    shutil.copytree(world["tokenizer"], tokenizer)
    (tokenizer / "chat_template.jinja").write_text(CONCAT)
    chat = {**world, "tokenizer": str(tokenizer), "paths": {}}
    for name, path in world["paths"].items():
        rows = []
        for r in (json.loads(line) for line in path.read_text().splitlines()):
            prompt = [{"role": "user", "content": r["prompt"]}]
            completion = [{"role": "assistant", "content": r["completion"]}]
            conversation = (
                {"messages": prompt + completion}
                if layout == "messages"
                else {"prompt": prompt, "completion": completion}
            )
            rows.append({**conversation, "domain": name})
        chat["paths"][name] = tmp_path / f"{name}-{layout}.jsonl"
        chat["paths"][name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return chat


# each message's content twice: another template than the chat tokenizer's own (CONCAT), so the
# counts tell which one rendered the conversations
DOUBLED = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{{ message['content'] }}{% endfor %}"
)


def chat_run_with_template(world, tmp_path, template_name: str = "doubled.jinja") -> tuple[dict, Path, Path]:
    """(the chat world, the DOUBLED template's file, a run whose recipe names it as
    data.chat_template and the chat world's conversations as train.data)."""
    from tests.conftest import recipe_tree

    chat = chat_world(world, tmp_path, "messages")
    template = tmp_path / template_name
    template.write_text(DOUBLED)
    fake = {"base": "/x/base", "experts": {n: f"/x/{n}" for n in WEIGHTS}, "dev": {"d": "/x/d.jsonl"}}
    tree = recipe_tree(fake, tmp_path / "run", train={"data": {n: str(p) for n, p in chat["paths"].items()}})
    tree["data"]["chat_template"] = str(template)
    return chat, template, write_run(tmp_path / "run", WEIGHTS, recipe=tree)


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def tool_world(world, tmp_path) -> dict:
    """The chat world, each conversation of its first domain calling a tool before it answers, as
    TRL's tool-calling records do: an assistant turn with ``tool_calls`` and no content, the tool's
    answer as a ``tool`` message, and the record's ``tools``."""
    chat = chat_world(world, tmp_path, "messages")
    name = next(iter(chat["paths"]))
    path = chat["paths"][name]
    rows = []
    for r in (json.loads(line) for line in path.read_text().splitlines()):
        user, answer = r["messages"]
        call = {
            "type": "function",
            "function": {"name": "weather", "arguments": {"city": user["content"][:5]}},
        }
        turns = [user, {"role": "assistant", "content": None, "tool_calls": [call]}]
        turns += [{"role": "tool", "content": "sunny"}, answer]
        rows.append({**r, "messages": turns, "tools": [WEATHER]})
    tools = tmp_path / f"{name}-tools.jsonl"
    tools.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {**chat, "paths": {**chat["paths"], name: tools}, "tool_domain": name}


def header_entries(written: str) -> dict:
    """The dataset entries an export's header lists, one JSON object per ``#   {...}`` line."""
    entries = {}
    for line in written.splitlines():
        if line.startswith("#   {"):
            entries.update(json.loads(line[4:]))
    return entries
