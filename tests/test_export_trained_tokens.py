"""export to TRL, axolotl, torchtune and LLaMA-Factory: each trainer's own tokenizing step, run on
the exported datasets, trains the fitted token shares.

These trainers add special tokens to each text or prompt/completion sample that mergeopt's count of
the record does not hold: TRL's SFTTrainer an EOS (its "Adding EOS" step), axolotl an EOS
(``type: completion`` unless the tokenizer writes one, the user-defined type always), torchtune a
BOS and an EOS where the tokenizer writes neither, LLaMA-Factory's pretraining an EOS in place of
the tokenizer's own special tokens. A sample count made from mergeopt's counts alone gave each
domain another token share than fitted (here b 0.483 for 0.5; 0.463 where torchtune adds two):
shorter samples gain relatively more. Each format's counts are now made from the tokens its
trainer trains on per sample, and each framework's own code tokenizes the exported datasets to the
fitted shares, with and without a budget, to the rounding of whole samples.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from mergeopt.export.formats import FORMATS
from tests.conftest import REPO
from tests.export_world import SIZES, WEIGHTS, build_world, export, header_entries, yaml_body
from tests.llamafactory_child import run_llamafactory

ROUNDING = 1e-3  # whole samples: the largest gap that rounding the counts leaves here
BUDGETS = ((), ("--budget-tokens", "60000"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("trained"))


def data_of(world, tmp_path, layout: str, tokenizer: str) -> dict:
    """The world in ``layout`` (its prompt/completion records, or ``text``), its tokenizer writing a
    BOS (``bos``, the world's) or no special token at all (``plain``)."""
    data = world if layout == "prompt_completion" else text_world(world, tmp_path)
    if tokenizer == "bos":
        return data
    plain = tmp_path / "plain-tokenizer"
    shutil.copytree(world["tokenizer"], plain)
    spec = json.loads((plain / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (plain / "tokenizer.json").write_text(json.dumps(spec))
    return {**data, "tokenizer": str(plain)}


# the special tokens each trainer adds to a sample of the world, by the tokenizer (either layout)
ADDED = {
    "trl": {"bos": 1, "plain": 1},
    "axolotl": {"bos": 1, "plain": 1},
    "torchtune": {"bos": 1, "plain": 2},
}


def said(fmt: str, tokenizer: str) -> str:
    added = ADDED[fmt][tokenizer]
    each = ", ".join(f"{n} +{added}" for n in WEIGHTS)
    return f"of the tokens {fmt} trains on (the count and the special tokens it adds to each sample: {each})"


def text_world(world, tmp_path) -> dict:
    """The world's records as ``text`` (prompt + completion: the same characters)."""
    out = {**world, "paths": {}}
    for name, path in world["paths"].items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        out["paths"][name] = tmp_path / f"{name}-text.jsonl"
        out["paths"][name].write_text(
            "".join(json.dumps({"text": r["prompt"] + r["completion"], "domain": name}) + "\n" for r in rows)
        )
    return out


def largest_gap(tokens: dict[str, int]) -> float:
    total = sum(tokens.values())
    return max(abs(tokens[n] / total - WEIGHTS[n]) for n in WEIGHTS)


# ---------------------------------------------------------------- TRL


def trl_tokens(config, tokenizer_path, tmp_path) -> dict[str, int]:
    """Tokens per domain of TRL's parser, loader and SFTTrainer's dataset preparation."""
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl.scripts import utils

    with warnings.catch_warnings():  # transformers' own deprecations inside TrainingArguments
        warnings.simplefilter("ignore")
        args, mixture = utils.TrlParser((trl.SFTConfig, utils.DatasetMixtureConfig)).parse_args_and_config(
            ["--config", str(config), "--output_dir", str(tmp_path / "trl"), "--report_to", "none"]
            + ["--use_cpu", "true", "--bf16", "false", "--max_length", "100000"]
        )
    train = utils.get_dataset(mixture)["train"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    sizes = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **sizes))
    prepared = trl.SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer
    ).train_dataset
    tokens = dict.fromkeys(WEIGHTS, 0)
    for ids, domain in zip(prepared["input_ids"], prepared["domain"], strict=True):
        tokens[domain] += len(ids)
    return tokens


@pytest.mark.parametrize("tokenizer", ["bos", "plain"])
@pytest.mark.parametrize("layout", ["prompt_completion", "text"])
@pytest.mark.parametrize("extra", BUDGETS)
def test_trl_trains_the_fitted_token_shares(world, tmp_path, layout, extra, tokenizer):
    pytest.importorskip("trl")
    data = data_of(world, tmp_path, layout, tokenizer)
    out = tmp_path / "trl.yaml"
    out.write_text(export(data, "trl", tmp_path, *extra))
    assert largest_gap(trl_tokens(out, data["tokenizer"], tmp_path)) < ROUNDING
    assert said("trl", tokenizer) in out.read_text()


def ending_with_eos(data: dict, layout: str, tmp_path) -> dict:
    """``data`` with every other record of domain a ending with the EOS text ("</s>")."""
    key = "text" if layout == "text" else "completion"
    rows = [json.loads(line) for line in data["paths"]["a"].read_text().splitlines()]
    for row in rows[::2]:
        row[key] += "</s>"
    ending = tmp_path / "a-eos.jsonl"
    ending.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**data, "paths": {**data["paths"], "a": ending}}


@pytest.mark.parametrize("layout", ["prompt_completion", "text"])
def test_trl_adds_no_eos_to_a_record_that_already_ends_with_it(world, tmp_path, layout):
    """TRL appends the EOS only to a text or completion that does not end with the EOS text, and
    mergeopt's count of one that does already holds the EOS: half of a's records end with it
    (counted 7.5 tokens, trained 8, not 8.5: a gap of 0.0095 where every record got one)."""
    pytest.importorskip("trl")
    data = ending_with_eos(data_of(world, tmp_path, layout, "bos"), layout, tmp_path)
    out = tmp_path / "trl.yaml"
    out.write_text(export(data, "trl", tmp_path))
    assert largest_gap(trl_tokens(out, data["tokenizer"], tmp_path)) < ROUNDING


# ---------------------------------------------------------------- axolotl


def axolotl_tokens(exported: dict, data: dict) -> dict[str, int]:
    """Tokens per domain of axolotl's validated config, each entry loaded and tokenized by its SFT
    loader (``_load_and_process_single_dataset``: the prompt strategy of the entry's ``type``)."""
    schema = pytest.importorskip("axolotl.utils.schemas.config")
    sft = pytest.importorskip("axolotl.utils.data.sft")
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    cfg = schema.AxolotlInputConfig(
        base_model=data["tokenizer"], learning_rate=1e-5, sequence_len=4096, **exported
    )
    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
    domain_of = {str(p): n for n, p in data["paths"].items()}
    tokens = dict.fromkeys(WEIGHTS, 0)
    for entry in cfg.datasets:
        loaded, _ = sft._load_and_process_single_dataset(
            dataset_config=DictDefault(entry.model_dump(exclude_none=True)),
            cfg=DictDefault(cfg.model_dump(exclude_none=True)),
            tokenizer=tokenizer,
            split="train",
            seed=0,
        )
        tokens[domain_of[entry.path]] += sum(len(ids) for ids in loaded["input_ids"])
    return tokens


@pytest.mark.parametrize("tokenizer", ["bos", "plain"])
@pytest.mark.parametrize("layout", ["prompt_completion", "text"])
@pytest.mark.parametrize("extra", BUDGETS)
def test_axolotl_trains_the_fitted_token_shares(world, tmp_path, layout, extra, tokenizer):
    pytest.importorskip("axolotl.utils.data.sft")
    data = data_of(world, tmp_path, layout, tokenizer)
    text = export(data, "axolotl", tmp_path, *extra)
    assert largest_gap(axolotl_tokens(yaml_body(text), data)) < ROUNDING
    assert said("axolotl", tokenizer) in text


@pytest.mark.parametrize("layout", ["prompt_completion", "text"])
def test_axolotl_adds_no_eos_to_a_record_that_already_ends_with_it(world, tmp_path, layout):
    """axolotl's ``_tokenize`` (prompt_tokenizers.py) appends the EOS only where the ids do not
    already end with it, as TRL does: half of a's records ending with the EOS text got one EOS too
    many in the counts (a gap of 0.0095 against axolotl's own tokenizing)."""
    pytest.importorskip("axolotl.utils.data.sft")
    data = ending_with_eos(data_of(world, tmp_path, layout, "bos"), layout, tmp_path)
    text = export(data, "axolotl", tmp_path)
    assert largest_gap(axolotl_tokens(yaml_body(text), data)) < ROUNDING


# ---------------------------------------------------------------- torchtune


class ModelTokenizer:
    """A torchtune model tokenizer over the world's tokenizer.json, made as torchtune's own BOS/EOS
    ones (Llama 2, Mistral: SentencePiece) are: ``encode`` writes the text's ids, then a BOS and an
    EOS as asked (the ids and special tokens of torchtune's ``HuggingFaceBaseTokenizer``), and
    ``tokenize_messages`` is torchtune's ``tokenize_messages_no_special_tokens`` (a BOS before the
    turn, an EOS after the assistant's message)."""

    max_seq_len = None

    def __init__(self, path):
        from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

        self.base = HuggingFaceBaseTokenizer(
            f"{path}/tokenizer.json", tokenizer_config_json_path=f"{path}/tokenizer_config.json"
        )
        self.bos_id, self.eos_id = self.base.bos_id, self.base.eos_id

    def encode(self, text, add_bos=True, add_eos=True, **_):
        ids = self.base.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def __call__(self, sample, inference=False):
        from torchtune.modules.transforms.tokenizers import tokenize_messages_no_special_tokens

        tokens, mask = tokenize_messages_no_special_tokens(
            self, sample.pop("messages"), bos_id=self.bos_id, eos_id=self.eos_id
        )
        return {**sample, "tokens": tokens, "mask": mask}


def torchtune_tokens(entries: list[dict], data: dict) -> dict[str, int]:
    """Tokens per domain of each entry built by torchtune's ``config.instantiate`` with the model
    tokenizer, as a recipe's ``_setup_data`` builds them."""
    config = pytest.importorskip("torchtune.config")
    from omegaconf import OmegaConf

    tokenizer = ModelTokenizer(data["tokenizer"])
    domain_of = {str(p): n for n, p in data["paths"].items()}
    tokens = dict.fromkeys(WEIGHTS, 0)
    for entry in entries:
        built = config.instantiate(OmegaConf.create(entry), tokenizer)
        tokens[domain_of[entry["data_files"]]] += sum(len(built[i]["tokens"]) for i in range(len(built)))
    return tokens


@pytest.mark.parametrize("tokenizer", ["bos", "plain"])
@pytest.mark.parametrize("layout", ["prompt_completion", "text"])
@pytest.mark.parametrize("extra", BUDGETS)
def test_torchtune_trains_the_fitted_token_shares(world, tmp_path, layout, extra, tokenizer):
    pytest.importorskip("torchtune.config")
    data = data_of(world, tmp_path, layout, tokenizer)
    text = export(data, "torchtune", tmp_path, *extra)
    assert largest_gap(torchtune_tokens(yaml_body(text)["dataset"], data)) < ROUNDING
    assert said("torchtune", tokenizer) in text


def test_torchtune_header_says_what_role_headers_would_add(world, tmp_path):
    """instruct_dataset through a model tokenizer with role headers (Llama 3, Qwen 2.5) trains a
    header and an end of turn per message that the counts (a BOS/EOS tokenizer's) leave out; the
    export does not know the config's tokenizer, so the header says so and how far one token more
    per sample moves a share (computed here from the header's own means); text records get none."""
    text = export(world, "torchtune", tmp_path)
    (line,) = [x for x in text.splitlines() if "role headers" in x]
    assert line.startswith("# a, b, c: instruct_dataset counted as a BOS")
    means = {"a": 8, "b": 27, "c": 12}  # mean_tokens + the EOS torchtune adds
    raw = {n: WEIGHTS[n] / means[n] for n in WEIGHTS}
    more = {n: raw[n] * (means[n] + 1) for n in WEIGHTS}
    drift = max(abs(more[n] / sum(more.values()) - WEIGHTS[n]) for n in WEIGHTS)
    assert f"by up to {drift:.2g}" in line
    plain = export(text_world(world, tmp_path), "torchtune", tmp_path)
    assert "role headers" not in plain


# ---------------------------------------------------------------- what each adds


class Tokenizer:
    """A tokenizer that writes the given special tokens around every text."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, bos: bool, eos: bool):
        self.bos, self.eos = bos, eos

    def __call__(self, text):
        return {"input_ids": [1] * self.bos + [5] + [2] * self.eos}


@pytest.mark.parametrize(
    "fmt,layout,bos,eos,added",
    [
        ("trl", "text", True, False, 1),
        ("trl", "text", True, True, 1),  # text + EOS string: the tokenizer's own EOS after it
        ("trl", "prompt_completion", False, False, 1),
        ("trl", "messages", True, False, 0),
        ("trl", "prompt_completion_messages", True, False, 0),
        ("axolotl", "text", True, False, 1),
        ("axolotl", "text", True, True, 0),  # the ids already end with EOS
        ("axolotl", "prompt_completion", True, True, 1),  # the completion's own EOS, not counted
        ("axolotl", "messages", True, False, 0),
        ("torchtune", "text", False, False, 2),
        ("torchtune", "text", True, False, 1),
        ("torchtune", "prompt_completion", True, True, 0),
        ("torchtune", "messages", False, False, 0),
        ("llamafactory", "text", True, False, 0),  # the counted BOS left out, an EOS added
        ("llamafactory", "text", False, False, 1),
        ("llamafactory", "text", True, True, -1),
        ("llamafactory", "prompt_completion", False, False, 0),  # stage sft: the empty template
        ("llamafactory", "prompt_completion", True, False, -1),  # ... writes no BOS
        ("llamafactory", "messages", True, False, 0),
        ("hf-datasets", "text", False, False, 0),
    ],
)
def test_the_tokens_each_trainer_adds_per_sample(fmt, layout, bos, eos, added):
    from mergeopt.export.formats.base import Specials

    hook = FORMATS[fmt].added_tokens
    specials = Specials.of(Tokenizer(bos, eos))
    assert specials == Specials(bos, eos)
    assert (0 if hook is None else hook(layout, specials, frozenset([layout]))) == added
    if fmt == "llamafactory":  # text beside other layouts is trained under stage: sft
        sft = -bos - eos if layout != "messages" else 0  # the empty template: the text alone
        assert hook(layout, specials, frozenset([layout, "messages"])) == sft
        # with a chat_template, the tokens its rebuilt template writes around an empty exchange
        chat = Specials(bos, eos, template=28)
        assert hook(layout, chat, frozenset([layout, "messages"])) == (
            0 if layout == "messages" else sft + 28
        )


def test_a_token_budget_over_sample_shares_says_its_tokens_are_the_trained_ones(world, tmp_path):
    """Under weights.unit: samples the shares are TRL's as fitted, and a token budget's samples are
    made from the 8, 27 and 12 tokens TRL trains on per sample (60,000 / 18.7 = 3,209 samples, not
    the 3,390 of mergeopt's 7, 26 and 11), but TRL's header said only "budget: 60000 tokens" (no
    line of mean tokens: the shares convert not), so its counts differed from hf-datasets' unsaid."""
    from tests.export_world import write_run

    run = write_run(tmp_path / "run", WEIGHTS, unit="samples")
    text = export({**world, "mixture": run}, "trl", tmp_path, "--budget-tokens", "60000")
    assert (
        "# budget: 60000 tokens of the tokens trl trains on (the count and the special tokens it adds to "
        "each sample: a +1, b +1, c +1; mean tokens per sample a 8, b 27, c 12)"
    ) in text
    total = sum(WEIGHTS[n] * m for n, m in {"a": 8, "b": 27, "c": 12}.items())
    splits = [d["split"] for d in yaml_body(text)["datasets"]]
    assert splits[0] == f"train[:{round(WEIGHTS['a'] * 60000 / total)}]"  # a: 641.7 -> 642
    hf = export({**world, "mixture": run}, "hf-datasets", tmp_path, "--budget-tokens", "60000")
    assert "# budget: 60000 tokens\n" in hf  # it reads the counts as they are


def test_a_token_budgets_repetition_is_of_the_tokens_the_trainer_trains(world, tmp_path, capsys):
    """60,000 tokens take 1,714 of a's 1,500 samples at mergeopt's 7 tokens each, but 1,500 at the 8
    TRL trains on: the TRL file's epochs and the warning are TRL's (no repeat), those of a format
    that reads the counts as they are (hf-datasets) still repeat a."""
    trl = export(world, "trl", tmp_path, "--budget-tokens", "60000")
    assert "epochs over each source under the budget (measured datasets): a 1, " in trl
    assert "repeats datasets beyond one epoch" not in capsys.readouterr().err
    hf = export(world, "hf-datasets", tmp_path, "--budget-tokens", "60000")
    assert "epochs over each source under the budget (measured datasets): a 1.143, " in hf
    assert "the budget repeats datasets beyond one epoch: a 1.14x" in capsys.readouterr().err


def test_to_all_checks_the_repetition_of_each_formats_own_counts(world, tmp_path, capsys):
    """A sample budget gives b (26 tokens a sample) more of the samples where each sample trains one
    token more (TRL, axolotl, torchtune): 10,400 samples repeat b 3.93 times in mergeopt's counts,
    4.08 in TRL's. ``--to trl`` refused it; ``--to all`` checked mergeopt's counts alone, wrote TRL's
    file with b's 4.078 epochs above --max-epochs 4, and warned of b 3.93x."""
    from mergeopt.errors import run_cli
    from mergeopt.export.command import main
    from tests.conftest import recipe_tree
    from tests.export_world import write_run

    weights = {"a": 0.1, "b": 0.7, "c": 0.2}
    fake = {"base": "/x/base", "experts": {n: f"/x/{n}" for n in weights}, "dev": {"d": "/x/d.jsonl"}}
    run = write_run(tmp_path / "run", weights, recipe=recipe_tree(fake, tmp_path / "run"))
    out = tmp_path / "all"
    argv = [str(run), "--tokenizer", world["tokenizer"], "--budget-samples", "10400", "--datasets"]
    argv += [f"{n}={p}" for n, p in world["paths"].items()]
    assert run_cli(main, [*argv, "--to", "trl", "--out", str(tmp_path / "trl.yaml")]) == 2
    assert "repeats dataset 'b'" in capsys.readouterr().err
    assert run_cli(main, [*argv, "--to", "all", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"mergeopt: error: the budget repeats dataset 'b' ({world['paths']['b']}) 4.08 times, above "
        "--max-epochs 4; lower the budget, add data, or raise --max-epochs (in --to trl's counts"
    )
    assert not out.exists()
    # within --max-epochs, the warning is of the format that repeats most (TRL's b 4.08x, not 3.93x)
    assert run_cli(main, [*argv, "--to", "all", "--out", str(out), "--max-epochs", "5"]) == 0
    assert (
        "the budget repeats datasets beyond one epoch: a 1.57x, b 4.08x, c 1.31x" in capsys.readouterr().err
    )
    assert "b 4.078" in (out / "trl_datasets.yaml").read_text()


# ---------------------------------------------------------------- LLaMA-Factory (stage: pt)

# LLaMA-Factory's pretraining processor (packing on, as its parser sets it under stage: pt; blocks
# of one token: cutoff_len 2, less the one DataArguments keeps back; none is cut off) over each domain's texts: its tokens per record
LLAMAFACTORY_PT = """
import importlib.machinery, json, sys, types
audio = types.ModuleType("torchaudio")
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
from transformers import AutoTokenizer
from llamafactory.data.processor.pretrain import PretrainDatasetProcessor
from llamafactory.hparams import DataArguments

tokenizer_path, texts = json.loads(sys.argv[1])
processor = PretrainDatasetProcessor(
    None, AutoTokenizer.from_pretrained(tokenizer_path), None, DataArguments(packing=True, cutoff_len=2)
)
means = {}
for name, rows in texts.items():
    ids = processor.preprocess_dataset({"_prompt": [[{"role": "user", "content": t}] for t in rows]})
    means[name] = sum(len(block) for block in ids["input_ids"]) / len(rows)
print(json.dumps(means))
"""


@pytest.mark.parametrize("tokenizer", ["bos", "plain"])
def test_llamafactory_pretraining_trains_the_fitted_token_shares(world, tmp_path, tokenizer):
    """Text datasets are LLaMA-Factory pretraining data: its pt processor appends the EOS to each
    text and tokenizes it without special tokens. With a tokenizer that writes no BOS, each record
    trains a token more than counted (b 0.48 for 0.5 by interleave_probs written from the counts);
    with one that writes a BOS (left out, the EOS added), as many."""
    pytest.importorskip("llamafactory")

    data = data_of(world, tmp_path, "text", tokenizer)
    probs = yaml_body(export(data, "llamafactory", tmp_path))["interleave_probs"].split(",")
    texts = {
        n: [json.loads(line)["text"] for line in p.read_text().splitlines()] for n, p in data["paths"].items()
    }
    child = run_llamafactory(LLAMAFACTORY_PT, json.dumps([data["tokenizer"], texts]))
    assert child.returncode == 0, child.stderr[-2000:]
    means = json.loads(child.stdout.strip().splitlines()[-1])
    shares = {n: float(p) * means[n] for n, p in zip(WEIGHTS, probs, strict=True)}
    assert largest_gap(shares) < 1e-12


# ---------------------------------------------------------------- LLaMA-Factory (stage: sft)

# LLaMA-Factory's converter (each entry of the header's dataset_info.json) and supervised
# processor, with ``template:`` left out (get_template_and_fix_tokenizer: rebuilt from the
# tokenizer's chat_template, or the empty one without): its tokens per record of each domain
LLAMAFACTORY_SFT = """
import importlib.machinery, json, sys, types
audio = types.ModuleType("torchaudio")
audio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = audio
from transformers import AutoTokenizer
from llamafactory.data.converter import get_dataset_converter
from llamafactory.data.parser import get_dataset_list
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments

tokenizer_path, entries = json.loads(sys.argv[1])
means, kept = {}, {}
for name, entry in entries.items():
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    args = DataArguments(cutoff_len=10**6)
    template = get_template_and_fix_tokenizer(tokenizer, args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=args)
    attr = get_dataset_list([name], {name: entry})[0]
    convert = get_dataset_converter(attr.formatting, attr, args)
    with open(entry["file_name"]) as f:
        rows = [convert(json.loads(line)) for line in f]
    ids = processor.preprocess_dataset({k: [r[k] for r in rows] for k in rows[0]})["input_ids"]
    kept[name] = len(ids)  # the records it trains (a skipped conversation is dropped)
    means[name] = sum(len(i) for i in ids) / len(rows)
print(json.dumps({"means": means, "kept": kept}))
"""

# a chat template with role headers and a default system prompt, as Qwen's and SmolLM2's
ROLES = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = 'Be kind.' %}{% set msgs = messages %}{% endif %}"
    "[S]{{ sys }}[/S]{% for m in msgs %}[{{ m['role'][0] }}]{{ m['content'] }}[/]{% endfor %}"
    "{% if add_generation_prompt %}[a]{% endif %}"
)


def test_a_template_refusing_empty_messages_is_measured_on_one_character_ones(world, tmp_path):
    """A chat template that raises on an empty message was taken for no template at all (the
    empty one's count, 22 tokens fewer than LLaMA-Factory writes around each record here)."""
    from transformers import AutoTokenizer

    from mergeopt.export.formats.base import Specials
    from tests.export_world import chat_world

    chat = chat_world(world, tmp_path, "messages")
    tokenizer = AutoTokenizer.from_pretrained(chat["tokenizer"])
    tokenizer.chat_template = ROLES
    plain = Specials.of(tokenizer).template
    refusing = "{% for m in messages %}{% if not m['content'] %}{{ raise_exception('empty') }}{% endif %}{% endfor %}"
    tokenizer.chat_template = refusing + ROLES
    assert plain is not None and Specials.of(tokenizer).template == plain


# ROLES without its BOS, and a template that writes its BOS and no default system prompt
ROLES_NO_BOS = ROLES.removeprefix("{{ bos_token }}")
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'][0] }}]{{ m['content'] }}[/]{% endfor %}"
    "{% if add_generation_prompt %}[a]{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "writes_bos", "differ"),
    [
        (ROLES, True, ""),  # the template writes the BOS the tokenizer writes: rebuilt as it is
        (ROLES_NO_BOS, True, "a, b, c"),  # the BOS's 3 characters cut off each turn's slot: '[S]'
        (NO_SYSTEM, False, "c"),  # the BOS in the user's slot: written at each user turn
        (NO_SYSTEM, True, ""),
    ],
)
def test_llamafactory_header_says_where_its_rebuilt_template_writes_otherwise(
    world, tmp_path, template, writes_bos, differ
):
    """LLaMA-Factory (template: left out) rebuilds a template from the tokenizer's chat_template
    taking ``decode(encode(""))``, the BOS the tokenizer writes itself, as the template's first
    characters: where the chat_template does not write it, that many characters are cut off each
    turn it cuts out (the system turn's '[S]' here, SmolLM2's '<|im_start|>s'); where the
    chat_template writes a BOS the tokenizer does not, with no default system prompt, the BOS
    becomes part of the user's turn, written at each one. The records' tokens then differ from
    the counted ones (a share gap of 0.010 and 0.006 here), without a word: the header now says
    so, naming the datasets LLaMA-Factory's own processor tokenizes otherwise, and none where it
    tokenizes as counted."""
    pytest.importorskip("llamafactory")

    from tests.export_world import chat_world

    chat = chat_world(world, tmp_path, "messages")
    tokenizer = tmp_path / "chat-tokenizer"
    (tokenizer / "chat_template.jinja").write_text(template)
    if not writes_bos:
        spec = json.loads((tokenizer / "tokenizer.json").read_text())
        spec["post_processor"] = None
        (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    path = chat["paths"]["c"]  # two exchanges in each conversation of c
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "messages": r["messages"] * 2}) + "\n" for r in rows))
    text = text_world(world, tmp_path)
    data = {**chat, "paths": {"a": text["paths"]["a"], "b": world["paths"]["b"], "c": path}}
    written = export(data, "llamafactory", tmp_path)
    entries = header_entries(written)
    read = llamafactory_sft(str(tokenizer), entries)
    means = read.get("means", read)
    (counted,) = [line for line in written.splitlines() if "mean tokens per sample" in line]
    counted = dict(item.split(" ") for item in counted.rsplit(": ", 1)[1].split(", "))
    otherwise = [n for n in WEIGHTS if abs(means[n] - float(counted[n])) > 0.01]
    assert ", ".join(otherwise) == differ
    lines = [line for line in written.splitlines() if "rebuilds a template from the tokenizer's" in line]
    if not differ:
        assert lines == []
    else:
        (line,) = lines
        assert f"so {differ} train another text than counted" in line
        assert ("cuts that many characters off" in line) == writes_bos


def test_llamafactory_header_gives_the_cutoff_len_that_keeps_every_sample_whole(world, tmp_path):
    """LLaMA-Factory's supervised processor cuts each sample to cutoff_len tokens, and the counts
    are of whole samples: a dataset of longer samples trained fewer tokens than its share (0.039
    over SmolLM2's tokenizer with cutoff_len 256 and texts of up to 430 tokens), without a word.
    The header now gives each dataset's longest sample as LLaMA-Factory trains it: under that
    cutoff_len its own processor trains the fitted shares, one token less cuts that dataset."""
    pytest.importorskip("llamafactory")
    import re

    from tests.export_world import chat_world

    chat = chat_world(world, tmp_path, "messages")
    (tmp_path / "chat-tokenizer" / "chat_template.jinja").write_text(ROLES)
    text = text_world(world, tmp_path)
    data = {**chat, "paths": {"a": text["paths"]["a"], "b": world["paths"]["b"], "c": chat["paths"]["c"]}}
    written = export(data, "llamafactory", tmp_path)
    probs = yaml_body(written)["interleave_probs"].split(",")
    entries = header_entries(written)
    (line,) = [line for line in written.splitlines() if "cuts each sample to cutoff_len" in line]
    longest = {n: int(t) for n, t in re.findall(r"([abc]) (\d+)", line.split("hold ", 1)[1])}
    # as trained: a record's characters and the template's 28 tokens around it (its BOS included)
    assert longest == {"a": 8 + 28, "b": 30 + 28, "c": 11 + 28}
    most = max(longest.values())
    assert f"a cutoff_len below {most} trains fewer tokens" in line

    def trained(cutoff: int) -> dict[str, float]:
        read = llamafactory_sft(chat["tokenizer"], entries, cutoff)
        return read.get("means", read)

    whole, cut = trained(most), trained(most - 1)
    shares = {n: float(p) * whole[n] for n, p in zip(WEIGHTS, probs, strict=True)}
    assert largest_gap(shares) < 1e-12
    assert [n for n in WEIGHTS if cut[n] < whole[n]] == [n for n in WEIGHTS if longest[n] == most]


@pytest.mark.parametrize("template", ["roles", "none"])
def test_llamafactory_sft_trains_the_fitted_token_shares(world, tmp_path, template):
    """Prompt/completion records, and text records as responses beside them, are trained under
    stage: sft, formatted by the template LLaMA-Factory rebuilds from the tokenizer's chat_template
    (template: left out): its role headers and default system prompt around each record, 27 tokens
    here, were not counted (a trained 0.424 for 0.2 by interleave_probs from the bare counts; over
    SmolLM2's own template, 32 tokens, a gap of 0.20); without a chat_template the empty one writes
    the prompt and completion without the counted BOS (b 0.520 for 0.5). Conversations were counted
    with that template: as many."""
    pytest.importorskip("llamafactory")

    from tests.export_world import chat_world

    text = text_world(world, tmp_path)
    paths = {"a": text["paths"]["a"], "b": world["paths"]["b"], "c": world["paths"]["c"]}
    tokenizer = world["tokenizer"]
    if template == "roles":
        chat = chat_world(world, tmp_path, "messages")
        (tmp_path / "chat-tokenizer" / "chat_template.jinja").write_text(ROLES)
        paths["c"], tokenizer = chat["paths"]["c"], chat["tokenizer"]
    data = {**world, "paths": paths, "tokenizer": tokenizer}
    written = export(data, "llamafactory", tmp_path)
    probs = yaml_body(written)["interleave_probs"].split(",")
    entries = header_entries(written)
    assert entries["a"]["columns"] == {"response": "text"}  # stage: sft
    added = {"roles": 27, "none": -1}[template]
    assert "(prompt/completion or text, counted bare)" in written
    assert f"a {added:+d}, b {added:+d}" in written
    read = llamafactory_sft(tokenizer, entries)
    assert read["kept"] == {n: SIZES[n] for n in WEIGHTS}
    shares = {n: float(p) * read["means"][n] for n, p in zip(WEIGHTS, probs, strict=True)}
    assert largest_gap(shares) < 1e-12


def llamafactory_sft(tokenizer: str, entries: dict, cutoff_len: int | None = None) -> dict:
    """LLAMAFACTORY_SFT's answer: each dataset's tokens per record and the records it trains
    (``cutoff_len``: its samples cut to that many tokens, else none)."""

    script = LLAMAFACTORY_SFT
    if cutoff_len is not None:
        script = script.replace("DataArguments(cutoff_len=10**6)", f"DataArguments(cutoff_len={cutoff_len})")
    child = run_llamafactory(script, json.dumps([tokenizer, entries]))
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_llamafactory_header_counts_the_conversations_its_converter_skips(world, tmp_path):
    """A conversation that ends on a user's turn (or whose turns are not a user's and an
    assistant's in turn) is skipped by LLaMA-Factory's sharegpt converter, after mergeopt counted
    it: its dataset trains fewer tokens than its share (b 0.40 for 0.5 where 30% of b's multi-turn
    conversations ended on a user's turn, over SmolLM2's template), without a word. The header now
    says how many records of which dataset, as many as LLaMA-Factory's own converter and processor
    drop."""
    pytest.importorskip("llamafactory")
    from tests.export_world import chat_world

    chat = chat_world(world, tmp_path, "messages")
    (tmp_path / "chat-tokenizer" / "chat_template.jinja").write_text(ROLES)
    path = chat["paths"]["b"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 0:  # a further question left unanswered
            row["messages"] = [*row["messages"], {"role": "user", "content": "ok"}]
        elif i % 3 == 1:  # two exchanges: trained, every assistant turn
            row["messages"] = [*row["messages"], *row["messages"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = export(chat, "llamafactory", tmp_path)
    read = llamafactory_sft(chat["tokenizer"], header_entries(written))
    skipped = {n: SIZES[n] - read["kept"][n] for n in WEIGHTS}
    assert skipped == {"a": 0, "b": 400, "c": 0}
    assert "# b: 400 of its 1,200 records are not a user's turn and an assistant's in turn" in written
    assert sum("sharegpt converter skips" in line for line in written.splitlines()) == 1


class DefaultSystemAfterThePrompt:
    """A stub tokenizer whose chat template writes its default system prompt ("DEFAULT") after each
    assistant header where no system message is given: find_diff in LLaMA-Factory's
    parse_template stops at the end of the rendering with an empty system message, so it finds no
    default system prompt there."""

    chat_template = "stub"

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        assistant = "<asst>:" + ("" if messages[0]["role"] == "system" else "DEFAULT")
        heads = {"system": "<sys>:", "user": "<user>:", "assistant": assistant}
        turns = [m for m in messages if m["content"]]  # an empty system message writes nothing
        text = "".join(f"{heads[m['role']]}{m['content']}\n" for m in turns)
        return text + (assistant if add_generation_prompt else "")


def test_the_rebuilt_templates_default_system_prompt_is_found_as_llamafactory_finds_it():
    """find_diff("<user>:{{content}}\\n<asst>:", "<user>:{{content}}\\n<asst>:DEFAULT") is "" in
    LLaMA-Factory 0.9.5 (it stops at the shorter's end); the mirror read "DEFAULT". Its own
    parse_template gives the same slots, where it imports."""
    from mergeopt.export.formats.llamafactory import rebuilt_template

    tokenizer = DefaultSystemAfterThePrompt()
    prefix, system, user, assistant, default = rebuilt_template(tokenizer)
    assert (prefix, system, default) == ("", "<sys>:{{content}}\n", "")
    assert user == "{{content}}\n<asst>:DEFAULT"  # cut by the sole (empty) system turn's 7 characters
    pytest.importorskip("llamafactory")

    script = "\n".join(LLAMAFACTORY_PT.splitlines()[1:5]) + (  # its torchaudio stand-in
        "\nfrom llamafactory.data.template import parse_template"
        "\nfrom tests.test_export_trained_tokens import DefaultSystemAfterThePrompt"
        "\nt = parse_template(DefaultSystemAfterThePrompt())"
        "\nprint(json.dumps([t.default_system, t.format_user.slots]))"
    )
    child = run_llamafactory(script, cwd=REPO)
    assert child.returncode == 0, child.stderr[-2000:]
    assert json.loads(child.stdout.strip().splitlines()[-1]) == [default, [user]]
