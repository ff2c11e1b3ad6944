"""The sections about real runs: the built-in worlds, training experts and grid runs (train), and
checking (rank) and correcting (calibrate) the proxy against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mergeopt.config.base import PathText, Section, changed_options, named_once
from mergeopt.inputs import MAX_SEED


class WorldSection(Section):
    """Where built-in worlds (paths written ``tiny://...``, ``smollm2://...``) are built and cached."""

    cache_dir: PathText | None = Field(
        default=None, description="Default: $MERGEOPT_CACHE or ~/.cache/mergeopt."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the built-in worlds.")


class LoraSection(Section):
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


class MixtureSetSection(Section):
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


class TrainSection(Section):
    """Small-world training: one expert per domain and ground-truth runs on mixtures, same budget."""

    data: dict[str, PathText] = Field(
        description="Expert name -> training set (JSONL, or a table the datasets library reads); the names of model.experts."
    )
    output_dir: PathText = Field(
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

    def unused_options(self) -> list[str]:
        """The options set away from their defaults that this training does not read: ``train.lora.r``
        with ``method: full``, a lattice's ``divisions`` with ``mixtures.kind: dirichlet``. Warned,
        as a fit warns of another strategy's options (a recipe may keep both and switch)."""
        unused = []
        if self.method != "lora":
            unused += [
                f"train.lora.{o} {v} is read only with train.method lora"
                for o, v in changed_options(self.lora)
            ]
        kinds = {
            "divisions": "lattice",
            "interior_only": "lattice",
            "alpha": "dirichlet",
            "count": "dirichlet",
        }
        kinds["weights"] = "list"
        unused += [
            f"train.mixtures.{o} {v} is read only with train.mixtures.kind {kinds[o]}"
            for o, v in changed_options(self.mixtures)
            if o in kinds and kinds[o] != self.mixtures.kind
        ]
        return unused


class RankSection(Section):
    """Rank checks of the merged proxy against ground-truth runs (a grid table from mergeopt.worlds.train)."""

    grid: PathText | None = Field(
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
        return named_once(names, "a baseline")


class CalibrateSection(Section):
    """``mergeopt calibrate``: the proxy corrected by real runs, and the mixture to train next."""

    grid: PathText | None = Field(
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
