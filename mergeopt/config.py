"""The recipe: one typed, frozen schema that holds every default, loaded from YAML with overrides.

A recipe is the whole description of a run. Keeping every default here (and nowhere else) means a
saved ``recipe.yaml`` in a run directory reproduces the run exactly, and a typo in a key is caught
before any model is loaded. Overrides use dotted keys, as in torchtune:
``python -m mergeopt.fit recipes/tiny.yaml optim.lr=0.1 output_dir=/tmp/run``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeopt.errors import UserError
from mergeopt.inputs import existing_file
from mergeopt.merging.constraints import FeasibleSet, repetition_caps
from mergeopt.merging.simplex import SIMPLEX_TOLERANCE, mixture_problem


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN passes every comparison test (abs(nan - 1) > tol is false) and inf
    # passes every `gt=0`, so every float of a recipe, nested ones too, must be a finite number
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


MAX_SEED = 2**63 - 1  # mergeopt.inputs.MAX_SEED: what numpy, torch and random all accept


def check_name(name: str, what: str) -> str:
    """Names become CSV columns, config keys and file names: no separators, no '..' (nothing can
    escape the output directory through a name)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} may only use letters, digits, '_', '.', '-' (not starting with '.', no '..')"
        )
    return name


def _says_test(name: str) -> bool:
    """'test' as a whole word: gsm8k_test, test-00000-of-00001, Math.Test; not contest, latest, testing."""
    return "test" in re.split(r"[^a-z0-9]+", name.lower())


def says_test_split(name: str, path: str) -> str | None:
    """Where a dev set says it is a test split, or None: the word 'test' in its name or its file's stem,
    or a folder named 'test' holding the file (a dataset's split folder, mmlu/test/x.jsonl).

    The folder must be named 'test' exactly: a folder such as ``tests`` or ``test_run0`` (pytest's
    temporary folders) is where files live, not what they hold.
    """
    file = Path(path)
    if _says_test(name):
        return f"its name {name!r}"
    if _says_test(file.stem):
        return f"its file name {file.name!r}"
    if file.parent.name.lower() == "test":
        return f"its folder {file.parent.name!r}"
    return None


class ModelSection(_Strict):
    """The base checkpoint and one expert per domain, all fine-tuned from that base."""

    base: str = Field(description="HF checkpoint directory of the base model θ0.")
    experts: dict[str, str] = Field(
        description="Expert name -> HF checkpoint directory or PEFT LoRA adapter directory; at least 2."
    )
    exclude: tuple[str, ...] = Field(
        default=(), description="Regexes over parameter names kept at θ0 (e.g. 'embed_tokens', 'norm')."
    )
    stack_dtype: Literal["float32", "bfloat16", "float16", "int8"] = Field(
        default="float32",
        description="Storage dtype of the stack: anchor and differences (int8: differences with one "
        "absmax scale per expert and row, dequantised per layer; the anchor in the compute dtype). "
        "The merge arithmetic is float32.",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Dtype of the forward and backward (merge arithmetic and the gradient to w stay "
        "float32); auto: bfloat16 on a GPU that has it, float32 elsewhere. float16 is refused on the CPU.",
    )
    eval_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Dtype of the loss evaluations, which make no gradient (held-out early stopping, "
        "reported losses, zero-order scoring, the rank check); auto: float32. A bfloat16 merged weight "
        "is rounded by about as much as a task vector moves it, so bfloat16 evaluations rank close "
        "mixtures by rounding noise. Generation (metrics, lm-eval) runs in the compute dtype.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow custom modelling code from the base dir."
    )
    gguf_file: str | None = Field(
        default=None,
        description="A GGUF file inside model.base to load the base from (transformers dequantizes it); "
        "the experts are checked against the architecture it describes.",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Read pickled .bin checkpoints and adapters (torch.load with weights_only=True).",
    )
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = (
        Field(
            default=None,
            description="Spread the model over the local GPUs, each layer's stack beside it: a strategy "
            "planned with the stack's bytes, or an explicit {module: device} map. Default: all on `device`.",
        )
    )
    max_memory: dict[int | str, int | str] | None = Field(
        default=None,
        description="With device_map: bytes each GPU may hold, as accelerate writes it ({0: '70GiB'}); "
        "default: each GPU's free memory.",
    )
    shard: Literal["none", "fsdp"] = Field(
        default="none",
        description="Under torchrun, fsdp keeps 1/N of the rows of every matrix (the stack, LoRA factors, "
        "unmerged matrices) on each rank (FSDP2's Shard(0) layout), reads only those rows from the "
        "checkpoints and gathers each merged weight as its layer runs; none: every rank holds the "
        "whole stack.",
    )

    @field_validator("experts")
    @classmethod
    def _at_least_two(cls, experts: dict[str, str]) -> dict[str, str]:
        if len(experts) < 2:
            raise ValueError(f"needs at least 2 experts, got {len(experts)}")
        for name in experts:
            check_name(name, "expert name")
        return experts

    @field_validator("exclude")
    @classmethod
    def _regexes_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"pattern {pattern!r} is not a valid regex ({err})") from None
        return patterns


class DevSetSpec(_Strict):
    """One JSONL dev set; its weight is its share of the target loss."""

    name: str = Field(description="The set's name, used in reports, data.target and objective.terms[].dev.")
    path: str = Field(description="JSONL file of text, prompt/completion, or prompt/choices/answer records.")
    weight: float = Field(default=1.0, ge=0.0, description="The set's weight in a loss over all sets.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return check_name(name, "dev set name")


class DataSection(_Strict):
    """The dev sets the mixture is fitted on, and how they are read and split."""

    dev: tuple[DevSetSpec, ...] = Field(min_length=1, description="Dev sets, one per domain you care about.")
    target: str = Field(
        default="all", description="'all': the weighted average over dev sets; or the name of one dev set."
    )
    max_length: int = Field(
        default=256, gt=1, description="Tokens per example; longer examples are cut on the right."
    )
    heldout_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Share of each dev set held out for early stopping (0 disables early stopping).",
    )
    max_examples: int | None = Field(default=None, gt=0, description="Cap on examples read per dev set.")

    @model_validator(mode="after")
    def _names(self) -> DataSection:
        names = [d.name for d in self.dev]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dev set names must be unique, repeated: {', '.join(dupes)}")
        if self.target != "all" and self.target not in names:
            raise ValueError(
                f"target {self.target!r} is neither 'all' nor a dev set name ({', '.join(names)})"
            )
        targeted = names if self.target == "all" else [self.target]
        if sum(d.weight for d in self.dev if d.name in targeted) <= 0:
            raise ValueError("the targeted dev sets all have weight 0")
        return self


CAP_KEYS = {"tokens": ("token_budget", "tokens"), "samples": ("sample_budget", "samples")}  # by weights.unit


class WeightsSection(_Strict):
    """Where the search starts on the simplex, and the constraints every mixture it returns meets
    (mergeopt.merging.constraints: bounds, pins and repetition caps make one box on the simplex)."""

    unit: Literal["tokens", "samples"] = Field(
        default="tokens",
        description="What a mixture weight is a share of: training tokens (tokens, as pretraining "
        "frameworks blend and as RegMix's runs are mixed) or training samples "
        "(samples, as interleave_datasets' probabilities). mergeopt train draws each example's domain "
        "so that its runs train on these shares (tokens: domain i is drawn with probability "
        "proportional to w_i over its mean tokens per example); mixture.json records it, and "
        "mergeopt export reads its weights in this unit. The grid runs a fit is ranked against must "
        "be mixed in the same unit, and a repetition cap (max_epochs) counts its budget and sources "
        "in it.",
    )
    init: dict[str, float] | None = Field(
        default=None,
        description="Starting mixture {expert: w}, uniform when absent (with constraints: the most "
        "uniform feasible mixture). Every strategy starts from it: "
        "the gradient's and SPSA's first point, CMA-ES's initial mean; grid, dirichlet and surrogate "
        "evaluate it first, so no search returns a mixture its objective scores worse.",
    )
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Per-expert bounds {expert: [lo, hi]} on its weight, 0 <= lo <= hi <= 1; experts "
        "not named are free in [0, 1]. Every strategy returns a mixture within them.",
    )
    pinned: dict[str, float] = Field(
        default_factory=dict,
        description="Weights fixed in advance {expert: w}, each in [0, 1]; the other experts share "
        "1 - the pinned sum.",
    )
    max_epochs: float | None = Field(
        default=None,
        gt=0.0,
        description="Repetition cap R: no training source may be repeated more than R epochs in "
        "the training run's budget, counted in weights.unit. In tokens: w_i <= R * T_i / token_budget "
        "for source i of T_i tokens; in samples: w_i <= R * N_i / sample_budget for source i of N_i "
        "samples (Olmix caps at 5). Needs the budget, and each source's size: weights.tokens "
        "(weights.samples), or counted from train.data as mergeopt export counts it (with the base's "
        "tokenizer) before the fit loads its model.",
    )
    token_budget: int | None = Field(
        default=None, gt=0, description="With max_epochs in tokens: the training run's budget B in tokens."
    )
    tokens: dict[str, int] | None = Field(
        default=None,
        description="With max_epochs in tokens: training tokens T_i of each expert's source "
        "{expert: T_i}; experts not named are counted from train.data.",
    )
    sample_budget: int | None = Field(
        default=None,
        gt=0,
        description="With max_epochs and weights.unit: samples: the training run's budget S in samples.",
    )
    samples: dict[str, int] | None = Field(
        default=None,
        description="With max_epochs and weights.unit: samples: training samples N_i of each expert's "
        "source {expert: N_i}; experts not named are counted from train.data.",
    )

    groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Hierarchical mixture {group: [expert, ...]}: experts grouped into domains, w_i = "
        "the group's share times the expert's share within it. Experts no group names are each a group "
        "of their own, named after the expert. The gradient strategy learns both levels "
        "(softmax over group logits times softmax within each group; it starts with every group "
        "equal); dirichlet and surrogate draw a Dirichlet over the groups times one within each; "
        "mixture.json, report.md and the exports report both levels. With bounds, pins or caps, "
        "dirichlet and surrogate share out what the lower bounds and pins leave by the same "
        "hierarchical draw, conditioned on the box, and the gradient strategy steps on the "
        "experts' logits (one level) from the hierarchy's start.",
    )

    @field_validator("groups")
    @classmethod
    def _groups_partition(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for label, members in groups.items():
            check_name(label, "weights.groups name")
            if not members:
                raise ValueError(f"group {label!r} is empty; a group holds at least one expert")
            for expert in members:
                if expert in seen:
                    where = (
                        f"both {seen[expert]!r} and {label!r}"
                        if seen[expert] != label
                        else f"{label!r} twice"
                    )
                    raise ValueError(f"expert {expert!r} is in {where}; an expert belongs to one group")
                seen[expert] = label
        return groups

    @field_validator("bounds")
    @classmethod
    def _bounds_in_unit_interval(cls, bounds: dict[str, tuple[float, float]]) -> dict:
        for name, (lo, hi) in bounds.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
                raise ValueError(f"{name!r} has bounds [{lo:g}, {hi:g}]; they need 0 <= lo <= hi <= 1")
        return bounds

    @field_validator("pinned")
    @classmethod
    def _pins_in_unit_interval(cls, pinned: dict[str, float]) -> dict[str, float]:
        for name, value in pinned.items():
            if not math.isfinite(value) or value > 1.0:
                raise ValueError(f"{name!r} is pinned at {value:g}, above 1 (a weight is in [0, 1])")
            if value < 0.0:
                raise ValueError(f"{name!r} is pinned at {value:g}, below 0 (a weight is in [0, 1])")
        if math.fsum(pinned.values()) > 1.0 + SIMPLEX_TOLERANCE:
            raise ValueError(f"the pinned weights sum to {math.fsum(pinned.values()):g}, above 1")
        return pinned

    @field_validator("tokens", "samples")
    @classmethod
    def _positive_sizes(cls, sizes: dict[str, int] | None, info) -> dict[str, int] | None:
        for name, count in (sizes or {}).items():
            if count <= 0:
                raise ValueError(f"{name!r} has {count} {info.field_name}; a source has at least 1")
        return sizes

    @model_validator(mode="after")
    def _cap_parts_together(self) -> WeightsSection:
        if self.max_epochs is None:
            for key in ("token_budget", "tokens", "sample_budget", "samples"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"weights.{key} is only used by a repetition cap: set weights.max_epochs"
                    )
            return self
        budget, sizes = CAP_KEYS[self.unit]
        if getattr(self, budget) is None:
            raise ValueError(
                f"weights.max_epochs caps repetition within weights.{budget} ({self.unit}, weights.unit): "
                "set it too"
            )
        for unit, keys in CAP_KEYS.items():
            for key in keys:
                if unit != self.unit and getattr(self, key) is not None:
                    raise ValueError(
                        f"weights.{key} counts {unit}, but the cap counts {self.unit} (weights.unit): "
                        f"set weights.{budget} and weights.{sizes} instead"
                    )
        return self

    @property
    def cap_budget(self) -> int | None:
        """The repetition cap's budget in weights.unit (None without a cap)."""
        return getattr(self, CAP_KEYS[self.unit][0])

    @property
    def source_sizes(self) -> dict[str, int]:
        """The sources' sizes the recipe gives, in weights.unit (weights.tokens or weights.samples)."""
        return dict(getattr(self, CAP_KEYS[self.unit][1]) or {})

    @property
    def constrained(self) -> bool:
        return bool(self.bounds or self.pinned or self.max_epochs is not None)

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "temperature" in data:
            raise ValueError(
                "weights.temperature was removed: under Adam, a fit with temperature T is the fit with "
                "T = 1 and optim.lr divided by T; set optim.lr instead"
            )
        return data


class OptimSection(_Strict):
    """Adam on the logits z, with early stopping on the held-out part of the dev sets."""

    lr: float = Field(default=0.1, gt=0.0, description="Adam learning rate on the logits z.")
    steps: int = Field(default=200, ge=0, description="Maximum optimizer steps.")
    batch_size: int = Field(default=8, gt=0, description="Examples per targeted dev set in each micro-batch.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    eval_every: int = Field(default=10, gt=0, description="Steps between held-out evaluations.")
    patience: int = Field(default=5, gt=0, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=1e-4, ge=0.0, description="Smallest held-out gain that counts.")
    eval_batch_size: int = Field(
        default=32, gt=0, description="Batch size of the held-out and final evaluations."
    )
    checkpoint_every: int = Field(
        default=10,
        gt=0,
        description="Steps between saves of the gradient state to output_dir/checkpoint/ (also saved on "
        "SIGINT and SIGTERM); rerunning the same command continues from it.",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each decoder layer (its merge included) in the backward instead of "
        "keeping its activations: about one more forward per step, a fraction of the memory. The layers "
        "are those the model's _no_split_modules names.",
    )
    loss_chunk_tokens: int = Field(
        default=1024,
        gt=0,
        description="Tokens whose logits exist at once when computing the loss (the (B, L, V) float32 "
        "logits are never formed whole). A model whose logits the chunked path cannot reproduce (checked "
        "on a probe at load) falls back to whole logits.",
    )


class MergeSection(_Strict):
    """How the experts are merged at mixture w (mergeopt.merging.methods): θ0 + scale · Σ_i c_i(w) τ'_i."""

    method: Literal["linear", "ties", "dare_linear", "dare_ties"] = Field(
        default="linear",
        description="linear (task arithmetic), ties (trim, elect sign, disjoint mean), dare_linear, dare_ties.",
    )
    scale: float = Field(default=1.0, gt=0.0, description="Global task-vector scale λ (1: on the simplex).")
    density: float = Field(
        default=0.5, gt=0.0, le=1.0, description="ties/dare: fraction of each task vector kept."
    )
    majority_sign: Literal["total", "frequency"] = Field(
        default="total", description="ties/dare_ties: sign election by summed values or by counts."
    )
    mixup_alpha: float | None = Field(
        default=None,
        gt=0.0,
        description="M³ mixup on top of the method: coefficients w·λ/Σ(w·λ), λ ~ Dirichlet(α) drawn once per run.",
    )


class ObjectiveTerm(_Strict):
    """One score of the merged model; several terms combine into one utility (a weighted macro-average)."""

    kind: Literal["loss", "exact_match", "choice_accuracy", "custom", "lm_eval"] = Field(
        description="loss (differentiable), exact_match (greedy generation), choice_accuracy (log-likelihood "
        "of options), custom, lm_eval (an lm-eval-harness task)."
    )
    dev: str = Field(
        default="all",
        description="Dev set it is scored on ('all' only for loss; lm_eval uses its task's data).",
    )
    weight: float = Field(default=1.0, gt=0.0, description="Share of this term in the utility.")
    name: str | None = Field(default=None, description="Column name in logs; default '<kind>:<dev>'.")
    function: str | None = Field(
        default=None, description="custom: 'package.module:function' called with (model, tokenizer, records)."
    )
    higher_is_better: bool = Field(default=True, description="custom, lm_eval: direction of the score.")
    max_new_tokens: int = Field(default=32, gt=0, description="exact_match: greedy tokens generated.")
    stop: tuple[str, ...] = Field(
        default=("\n",),
        description="exact_match: the generation is cut at the first of these strings (lm-eval's "
        "until); [] for none.",
    )
    length_normalize: bool = Field(
        default=False,
        description="choice_accuracy: score options by log-likelihood per character (lm-eval's acc_norm).",
    )
    task: str | None = Field(default=None, description="lm_eval: the task name.")
    include_path: str | None = Field(
        default=None,
        description="lm_eval: a directory of task YAMLs (local tasks); null: lm-eval's own tasks.",
    )
    metric: str = Field(
        default="acc", description="lm_eval: the result key, e.g. 'acc' or 'exact_match,strict-match'."
    )
    limit: int | None = Field(default=None, gt=0, description="lm_eval: score only the first N documents.")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return f"lm_eval:{self.task}" if self.kind == "lm_eval" else f"{self.kind}:{self.dev}"

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> ObjectiveTerm:
        if self.kind == "custom":
            if not self.function or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.function):
                raise ValueError("a custom term needs function: 'package.module:function'")
        elif self.function is not None:
            raise ValueError(f"function is only for kind 'custom', not {self.kind!r}")
        if self.kind == "lm_eval":
            if not self.task:
                raise ValueError("an lm_eval term needs task: <lm-eval task name>")
            if self.dev != "all":
                raise ValueError("an lm_eval term is scored on its task's own data: leave dev unset")
        elif self.task is not None or self.include_path is not None:
            raise ValueError(f"task and include_path are only for kind 'lm_eval', not {self.kind!r}")
        elif self.kind != "loss" and self.dev == "all":
            raise ValueError(f"a {self.kind} term must name one dev set (dev: <name>)")
        return self


class ObjectiveSection(_Strict):
    """What the search maximizes. No terms: minimize the dev loss of data.target (differentiable)."""

    terms: tuple[ObjectiveTerm, ...] = Field(
        default=(), description="Scores combined into the utility; empty: the loss of data.target."
    )
    normalize: Literal["none", "experts"] = Field(
        default="none",
        description="experts: min-max each term over the K single experts before averaging (MergeMix).",
    )


class GridSearch(_Strict):
    """search.strategy grid: every mixture of a simplex lattice."""

    divisions: int = Field(default=10, gt=0, description="grid: lattice step 1/divisions (10: step 0.1).")


class DirichletSearch(_Strict):
    """search.strategy dirichlet: the best of N seeded Dirichlet draws."""

    alpha: float = Field(
        default=1.0, gt=0.0, description="dirichlet: concentration; Beta(α, α) for K = 2 (M³)."
    )
    samples: int = Field(default=64, gt=0, description="dirichlet: mixtures drawn (best of N).")


class CmaesSearch(_Strict):
    """search.strategy cmaes: CMA-ES on the logits z, w = softmax(z)."""

    sigma: float = Field(default=1.0, gt=0.0, description="cmaes: initial step size on the logits.")
    population: int | None = Field(
        default=None, gt=1, description="cmaes: population; null: the library's 4 + ⌊3 ln K⌋."
    )


class SpsaSearch(_Strict):
    """search.strategy spsa: simultaneous-perturbation stochastic approximation on the logits."""

    lr: float = Field(default=1.0, gt=0.0, description="spsa: gain a in a_k = a / (k + 1 + A)^0.602.")
    perturbation: float = Field(default=0.3, gt=0.0, description="spsa: c in c_k = c / (k + 1)^0.101.")
    stability: float = Field(default=5.0, ge=0.0, description="spsa: A.")


class SurrogateSearch(_Strict):
    """search.strategy surrogate (MergeMix): LightGBM fitted on real evaluations, its best verified."""

    seeds: int = Field(default=40, gt=1, description="surrogate: evaluated Dirichlet mixtures to fit on.")
    alpha: float = Field(
        default=1.0, gt=0.0, description="surrogate: Dirichlet concentration of seeds and candidates."
    )
    candidates: int = Field(default=100_000, gt=0, description="surrogate: mixtures scored by the surrogate.")
    verify: int = Field(default=5, gt=0, description="surrogate: best predicted mixtures evaluated for real.")
    n_estimators: int = Field(default=300, gt=0, description="surrogate: LightGBM boosting rounds.")
    learning_rate: float = Field(default=0.05, gt=0.0, description="surrogate: LightGBM learning rate.")
    num_leaves: int = Field(default=8, gt=1, description="surrogate: LightGBM leaves per tree.")
    min_child_samples: int = Field(default=3, gt=0, description="surrogate: LightGBM min samples per leaf.")


class SearchSection(_Strict):
    """Which strategy searches the simplex, and its evaluation budget."""

    strategy: Literal["gradient", "grid", "dirichlet", "cmaes", "spsa", "surrogate"] = Field(
        default="gradient", description="gradient needs a differentiable objective (loss terms only)."
    )
    budget: int | None = Field(
        default=None,
        gt=0,
        description="Most full dev-set evaluations of a zero-order strategy, the experts' included; "
        "null: the strategy's own count. The gradient strategy's budget is optim.steps.",
    )
    grid: GridSearch = GridSearch()
    dirichlet: DirichletSearch = DirichletSearch()
    cmaes: CmaesSearch = CmaesSearch()
    spsa: SpsaSearch = SpsaSearch()
    surrogate: SurrogateSearch = SurrogateSearch()


class WorldSection(_Strict):
    """Where built-in worlds (paths written ``tiny://...``, ``smollm2://...``) are built and cached."""

    cache_dir: str | None = Field(default=None, description="Default: $MERGEOPT_CACHE or ~/.cache/mergeopt.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the built-in worlds.")


class LoraSection(_Strict):
    """LoRA adapters for train.method = lora (peft.LoraConfig fields)."""

    r: int = Field(default=8, gt=0, description="LoRA rank.")
    alpha: float = Field(
        default=16.0, gt=0, description="LoRA alpha: scaling alpha / r, or alpha / √r with use_rslora."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        min_length=1,
        description="Modules that get adapters: every attention and MLP projection by default.",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling, alpha / √r.")


class MixtureSetSection(_Strict):
    """Which ground-truth mixtures to train: a simplex lattice, Dirichlet samples, or a list."""

    kind: Literal["lattice", "dirichlet", "list"] = Field(
        default="lattice",
        description="lattice (every w_i a multiple of 1/divisions), dirichlet (seeded samples) or list.",
    )
    divisions: int = Field(default=2, gt=0, description="lattice: step 1/divisions on each weight.")
    interior_only: bool = Field(default=False, description="lattice: keep only points with every weight > 0.")
    alpha: float = Field(
        default=1.0, gt=0.0, description="dirichlet: symmetric concentration; Beta(α, α) for two experts."
    )
    count: int = Field(default=10, gt=0, description="dirichlet: number of samples.")
    weights: tuple[dict[str, float], ...] = Field(default=(), description="list: explicit mixtures.")


class TrainSection(_Strict):
    """Small-world training: one expert per domain and ground-truth runs on mixtures, same budget."""

    data: dict[str, str] = Field(description="Expert name -> training JSONL; the names of model.experts.")
    output_dir: str = Field(
        default="runs/train",
        description="Mixture runs (mixtures/NNN) and grid.csv go here; experts go to model.experts.",
    )
    method: Literal["full", "lora"] = Field(
        default="full",
        description="full fine-tuning, or lora (the adapter saved under adapter/, the merged dense "
        "model beside it).",
    )
    lora: LoraSection = LoraSection()
    steps: int = Field(default=200, gt=0, description="Optimizer steps of every run.")
    batch_tokens: int = Field(
        default=512,
        gt=0,
        description="Tokens per step: batches are filled with examples up to this many, so every run "
        "sees the same budget.",
    )
    lr: float = Field(default=1e-3, gt=0.0, description="AdamW learning rate, decayed linearly to 0.")
    max_length: int = Field(default=256, gt=1, description="Tokens per training example.")
    checkpoint_every: int = Field(
        default=50,
        gt=0,
        description="Steps between checkpoints of the run in progress; rerunning resumes it.",
    )
    mixtures: MixtureSetSection = MixtureSetSection()


def _named_once(names: tuple[str, ...], what: str) -> tuple[str, ...]:
    """``names`` as given, or the one-line error of a list that names ``what`` twice."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"names {what} twice: {', '.join(twice)}")
    return names


class RankSection(_Strict):
    """Rank checks of the merged proxy against ground-truth runs (a grid table from mergeopt.worlds.train)."""

    grid: str | None = Field(
        default=None,
        description="A grid table of trained mixtures (mergeopt train's grid.csv); fit then ranks its proxy "
        "against it.",
    )
    k: int = Field(default=3, gt=0, description="top-k size.")
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap resamples for the intervals.")
    baselines: tuple[Literal["interpolation", "lightgbm_loo", "mixing_law_loo"], ...] = Field(
        default=("interpolation", "lightgbm_loo", "mixing_law_loo"),
        description="What a grid rank report sets beside the proxy: interpolation of the experts' scores "
        "(free), and LightGBM and the mixing law, each fitted once per run and per metric leaving that run "
        "out (the mixing law took 18 to 27 s per metric on 64 runs over 17 domains on 2 CPU cores). Leave "
        "the regressions out on a large grid with many metrics; [] for none.",
    )

    workers: int | None = Field(
        default=None,
        gt=0,
        description="Processes for the baselines' leave-one-out fits (the same predictions with any number; "
        "a script that calls mergeopt needs `if __name__ == '__main__':`, as for any Python process pool). "
        "Default: every CPU this process may use once the fits are long (fits x runs x experts at least "
        "100,000: RegMix's 64 runs over 17 domains, 1.8 to 2.1x faster on 2 CPUs), one below that "
        "(the tiny grid's report), where starting the pool costs more than it saves.",
    )

    @field_validator("baselines")
    @classmethod
    def _each_once(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return _named_once(names, "a baseline")


class CalibrateSection(_Strict):
    """``mergeopt calibrate``: the proxy corrected by real runs, and the mixture to train next."""

    grid: str | None = Field(
        default=None,
        description="grid.csv of the real runs so far (one w_<expert> column per expert, the truth "
        "columns of rank.grid); default: rank.grid. Append a row per new run and rerun to continue.",
    )
    metric: str = Field(
        default="target",
        description="What to optimise: 'target' (the targeted dev sets' weighted loss), a dev set's "
        "name, or an objective term's label (its score_<label> column; its direction is the term's).",
    )
    candidates: int = Field(
        default=128,
        gt=0,
        description="Dirichlet mixtures the proxy scores besides the runs, the experts and the fit's "
        "mixture: what the ranking, the pick and the proposals choose among. Each is one evaluation "
        "of the merged model on the whole dev sets (journaled: a rerun evaluates only new ones).",
    )
    alpha: float = Field(default=1.0, gt=0.0, description="Dirichlet concentration of the candidates.")
    batch: int = Field(
        default=1,
        gt=0,
        description="Mixtures proposed to train next, for runs in parallel (each further one assumes "
        "the previous came out as predicted, so a batch spreads out).",
    )
    exploration: float = Field(
        default=0.0,
        ge=0.0,
        description="ξ of expected improvement, in the proxy's spreads: larger explores more.",
    )
    pick: Literal["cautious", "mean"] = Field(
        default="cautious",
        description="How the pick is chosen: 'cautious', the lowest posterior 84th percentile "
        "(mean + 1 sd: an untrained mixture must beat the best run by more than its uncertainty), "
        "or 'mean', the lowest posterior mean.",
    )
    use_proxy: bool = Field(
        default=True,
        description="false: regression over w on the runs alone (the same model without the proxy), "
        "to see what the proxy adds.",
    )
    samples: int = Field(
        default=2000, ge=0, description="Posterior draws for each candidate's probability of being best."
    )


class LoggingSection(_Strict):
    """Experiment trackers that receive the fit's curves as it runs (mergeopt.reporting.tracking)."""

    backends: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = Field(
        default=(),
        description="Trackers to write to, several at once allowed: tensorboard, mlflow, wandb; "
        "none: nothing is logged (trace.csv / evaluations.csv are written either way).",
    )
    dir: str | None = Field(
        default=None,
        description="Where the trackers write (tensorboard/, mlflow.db, wandb/); default <output_dir>/logs.",
    )
    project: str = Field(
        default="mergeopt", description="The MLflow experiment and the W&B project the run is logged in."
    )
    run_name: str | None = Field(
        default=None, description="The run's name in the trackers; default: the last folder of output_dir."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow's store; default a local SQLite file, sqlite:///<dir>/mlflow.db, its "
        "artifacts beside it. A server URI (http://...) sends the run over the network.",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        default="offline",
        description="offline: W&B writes <dir>/wandb for a later `wandb sync`, no network; online: "
        "uploads as it runs (needs `wandb login`).",
    )

    @field_validator("backends", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, backends: Any) -> Any:
        return (backends,) if isinstance(backends, str) else backends  # logging.backends=mlflow

    @field_validator("backends")
    @classmethod
    def _once_each(cls, backends: tuple[str, ...]) -> tuple[str, ...]:
        return _named_once(backends, "a backend")


class Recipe(_Strict):
    """A whole run: the checkpoints, the dev sets, what is scored, how it is searched, and where it goes."""

    seed: int = Field(
        default=0,
        ge=0,
        le=MAX_SEED,
        description="Seeds the dev-set split, the batch order and every random draw.",
    )
    output_dir: str = Field(
        default="runs/default",
        description="The run directory (relative paths are relative to the working directory).",
    )
    device: str = Field(
        default="auto",
        description="auto (cuda when available, else cpu), cpu, cuda, cuda:N; under torchrun cuda gives each "
        "rank its LOCAL_RANK's GPU. mps is refused: it lacks the float64 of the logits' and losses' sums.",
    )
    deterministic: bool = Field(
        default=False,
        description="torch's deterministic algorithms and CUBLAS_WORKSPACE_CONFIG=:4096:8 (fit and train): "
        "bit-identical runs on one GPU, slower.",
    )
    allow_test_split: bool = Field(
        default=False,
        description="Fit on a benchmark's test split: an lm_eval term whose task is scored on its "
        "test_split, or a dev set whose name, file name or folder says 'test' (gsm8k_test.jsonl, "
        "mmlu/test/). Refused by default, as mergekit-evolve refuses it: a mixture tuned on a test set "
        "reports a score it will not get.",
    )
    model: ModelSection
    data: DataSection
    weights: WeightsSection = WeightsSection()
    optim: OptimSection = OptimSection()
    merge: MergeSection = MergeSection()
    objective: ObjectiveSection = ObjectiveSection()
    search: SearchSection = SearchSection()
    world: WorldSection = WorldSection()
    train: TrainSection | None = None
    rank: RankSection = RankSection()
    calibrate: CalibrateSection = CalibrateSection()
    logging: LoggingSection = LoggingSection()

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device == "mps":  # refused rather than half-working: MPS has no float64
            raise ValueError(
                "device 'mps' is not supported: mergeopt keeps the mixture logits, their optimizer and "
                "the loss sums in float64, which Apple's MPS lacks; use device=cpu"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
        return device

    @model_validator(mode="after")
    def _init_matches_experts(self) -> Recipe:
        init = self.weights.init
        if init is None:
            return self
        experts = set(self.model.experts)
        if set(init) != experts:
            raise ValueError(f"weights.init names {sorted(init)} but the experts are {sorted(experts)}")
        if (problem := mixture_problem(init)) is not None:
            raise ValueError(f"weights.init is not a mixture: {problem}")
        return self

    @model_validator(mode="after")
    def _constraints_are_feasible(self) -> Recipe:
        """Names, pins within bounds and Σlo ≤ 1 ≤ Σhi, checked here when every cap is known
        (token counts from train.data are checked once counted, before anything is written)."""
        w = self.weights
        experts = self.expert_names
        for key in ("bounds", "pinned", "tokens", "samples"):
            unknown = sorted(set(getattr(w, key) or {}) - set(experts))
            if unknown:
                raise ValueError(
                    f"weights.{key} names {unknown[0]!r}, which is not an expert ({', '.join(experts)})"
                )
        uncounted = [n for n in experts if n not in w.source_sizes]
        if w.max_epochs is not None and uncounted and self.train is None:
            raise ValueError(
                f"weights.max_epochs needs each source's {w.unit}, but none are given for {uncounted[0]!r}: "
                f"set weights.{w.unit} or train.data"
            )
        known = w.max_epochs is not None and not uncounted
        caps = repetition_caps(w.max_epochs, w.cap_budget, w.source_sizes) if known else None
        feasible = FeasibleSet.build(experts, w.bounds, w.pinned, caps)
        if (problem := feasible.problem()) is not None:
            raise ValueError(f"weights: no mixture meets the constraints: {problem}")
        if w.init is not None and (outside := feasible.violation(w.init)) is not None:
            raise ValueError(f"weights.init breaks the constraints: {outside}")
        return self

    @model_validator(mode="after")
    def _groups_name_experts(self) -> Recipe:
        """Groups hold known experts; a label is not another expert's name (mixture.json, report.md
        and the exports list groups and experts side by side)."""
        w, experts = self.weights, self.expert_names
        for label, members in w.groups.items():
            unknown = [m for m in members if m not in experts]
            if unknown:
                raise ValueError(
                    f"weights.groups {label!r} names {unknown[0]!r}, which is not an expert ({', '.join(experts)})"
                )
            if label in experts and members != [label]:
                raise ValueError(
                    f"weights.groups {label!r} is also an expert's name but holds {members}: rename the group"
                )
        return self

    @model_validator(mode="after")
    def _train_matches_experts(self) -> Recipe:
        if self.train is None:
            return self
        if set(self.train.data) != set(self.model.experts):
            raise ValueError(
                f"train.data names {sorted(self.train.data)} but the experts are {sorted(self.model.experts)}"
            )
        experts = set(self.model.experts)
        for i, mixture in enumerate(self.train.mixtures.weights):
            if set(mixture) != experts:
                raise ValueError(f"train.mixtures.weights[{i}] names {sorted(mixture)}, not the experts")
            if (problem := mixture_problem(mixture)) is not None:
                raise ValueError(f"train.mixtures.weights[{i}] is not a mixture: {problem}")
        if self.train.mixtures.kind == "list" and not self.train.mixtures.weights:
            raise ValueError("train.mixtures.kind is 'list' but train.mixtures.weights is empty")
        return self

    @model_validator(mode="after")
    def _objective_fits_data(self) -> Recipe:
        names = {d.name for d in self.data.dev}
        labels = []
        for i, term in enumerate(self.objective.terms):
            if term.dev != "all" and term.dev not in names:
                raise ValueError(
                    f"objective.terms[{i}].dev {term.dev!r} is not a dev set ({', '.join(sorted(names))})"
                )
            labels.append(term.label)
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"objective term names must be unique (set name:), repeated: {', '.join(dupes)}")
        differentiable = all(t.kind == "loss" for t in self.objective.terms)
        if self.search.strategy == "gradient" and not differentiable:
            kinds = sorted({t.kind for t in self.objective.terms if t.kind != "loss"})
            raise ValueError(
                f"search.strategy 'gradient' needs a differentiable objective, but the terms include {', '.join(kinds)}"
                " (use grid, dirichlet, cmaes, spsa or surrogate)"
            )
        if self.search.strategy == "gradient" and self.search.budget is not None:
            raise ValueError(
                "search.budget counts evaluations of the zero-order strategies; the gradient strategy's "
                "budget is optim.steps"
            )
        if self.search.strategy == "gradient" and self.objective.normalize != "none":
            raise ValueError("objective.normalize 'experts' needs a zero-order search.strategy")
        s = self.search
        if (
            s.strategy == "surrogate"
            and s.budget is not None
            and s.budget < s.surrogate.seeds + s.surrogate.verify
        ):
            raise ValueError(
                f"search.budget {s.budget} is smaller than the surrogate's seeds + verify "
                f"({s.surrogate.seeds} + {s.surrogate.verify})"
            )
        return self

    @model_validator(mode="after")
    def _no_test_split_dev_sets(self) -> Recipe:
        if self.allow_test_split:
            return self
        for d in self.data.dev:
            if (where := says_test_split(d.name, d.path)) is not None:
                raise ValueError(
                    f"dev set {d.name!r} ({d.path}) looks like a benchmark's test split ({where}); a "
                    "mixture tuned on it reports a score it will not get. Fit on a validation split, or "
                    "set allow_test_split: true"
                )
        return self

    @property
    def expert_names(self) -> list[str]:
        return list(self.model.experts)


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "output_dir=/tmp/x"]`` -> ``{"optim.lr": 0.1, "output_dir": "/tmp/x"}``.

    Values are read as YAML scalars or flow collections, so ``true``, ``3``, ``[a, b]`` and
    ``{math: 0.5, code: 0.5}`` get their natural types.
    """
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_\-]+)*", key):
            raise UserError(f"override {item!r} is not of the form key.sub=value")
        try:
            parsed[key] = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"override {item!r}: value is not valid YAML ({problem})") from None
    return parsed


def _apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` in the YAML tree; a number indexes a list (``data.dev.0.name``), as the
    validation errors spell list items."""
    node: Any = tree
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(
                    f"override {dotted}: {where} is a list of {len(node)} item(s); "
                    f"index it with 0 to {len(node) - 1}, not {part!r}"
                )
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise UserError(f"override {dotted}: {where} is not a section, cannot set a key under it")
        if last:
            node[index] = value
            return
        child = node[index] if isinstance(node, list) else node.get(part)
        if child is None:
            child = node[index] = {}
        node = child


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return loc, "unknown key"
    if error["type"] == "missing":
        return loc, "required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    return loc, msg


def recipe_from_dict(
    tree: dict[str, Any], source: str = "<recipe>", overridden: Sequence[str] = ()
) -> Recipe:
    """Validate a nested dict; the error names the source and the first offending key."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        loc, msg = _describe(err.errors()[0])
        where = f"{source}: {loc}" if loc else source
        origin = (
            " (set on the command line)"
            if any(loc == k or loc.startswith(k + ".") for k in overridden)
            else ""
        )
        raise UserError(f"{where}: {msg}{origin}") from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML (safe loader, no duplicate keys), apply ``key=value`` overrides, validate."""
    path = existing_file(path, "recipe")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (is this a YAML recipe?)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(tree).__name__}")
    parsed = parse_overrides(overrides)
    for key, value in parsed.items():
        _apply_override(tree, key, value)
    return recipe_from_dict(tree, str(path), list(parsed))


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default spelled out), loadable again with load_recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
