"""How the simplex is searched: the gradient strategy's optimiser (optim) and the zero-order
strategies with their options (search).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mergeopt.config.base import Section, changed_options


class OptimSection(Section):
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


class GridSearch(Section):
    """search.strategy grid: every mixture of a simplex lattice."""

    divisions: int = Field(default=10, gt=0, description="grid: lattice step 1/divisions (10: step 0.1).")


class DirichletSearch(Section):
    """search.strategy dirichlet: the best of N seeded Dirichlet draws."""

    alpha: float = Field(
        default=1.0, gt=0.0, description="dirichlet: concentration; Beta(α, α) for K = 2 (M³)."
    )
    samples: int = Field(default=64, gt=0, description="dirichlet: mixtures drawn (best of N).")


class CmaesSearch(Section):
    """search.strategy cmaes: CMA-ES on the logits z, w = softmax(z)."""

    sigma: float = Field(default=1.0, gt=0.0, description="cmaes: initial step size on the logits.")
    population: int | None = Field(
        default=None, gt=1, description="cmaes: population; null: the library's 4 + ⌊3 ln K⌋."
    )


class SpsaSearch(Section):
    """search.strategy spsa: simultaneous-perturbation stochastic approximation on the logits."""

    lr: float = Field(default=1.0, gt=0.0, description="spsa: gain a in a_k = a / (k + 1 + A)^0.602.")
    perturbation: float = Field(default=0.3, gt=0.0, description="spsa: c in c_k = c / (k + 1)^0.101.")
    stability: float = Field(default=5.0, ge=0.0, description="spsa: A.")


class SurrogateSearch(Section):
    """search.strategy surrogate (MergeMix): LightGBM fitted on real evaluations, its best verified."""

    seeds: int = Field(
        default=40,
        gt=1,
        description="surrogate: evaluated Dirichlet mixtures to fit on (at least 2 x min_child_samples, so a tree can split).",
    )
    alpha: float = Field(
        default=1.0, gt=0.0, description="surrogate: Dirichlet concentration of seeds and candidates."
    )
    candidates: int = Field(default=100_000, gt=0, description="surrogate: mixtures scored by the surrogate.")
    verify: int = Field(default=5, gt=0, description="surrogate: best predicted mixtures evaluated for real.")
    verify_distinct: bool = Field(
        default=True,
        description=(
            "surrogate: verify one mixture per predicted value, the best `verify` values (LightGBM predicts "
            "one value per plateau, so tied candidates are mixtures it cannot tell apart); false verifies "
            "the `verify` best candidates, ties included (MergeMix's top-k read literally)."
        ),
    )
    n_estimators: int = Field(default=300, gt=0, description="surrogate: LightGBM boosting rounds.")
    learning_rate: float = Field(default=0.05, gt=0.0, description="surrogate: LightGBM learning rate.")
    num_leaves: int = Field(default=8, gt=1, description="surrogate: LightGBM leaves per tree.")
    min_child_samples: int = Field(default=3, gt=0, description="surrogate: LightGBM min samples per leaf.")

    @model_validator(mode="after")
    def _fits_and_verifies(self) -> SurrogateSearch:
        if self.seeds < 2 * self.min_child_samples:  # no split leaves both sides their minimum
            raise ValueError(
                f"seeds={self.seeds} is fewer than 2 x min_child_samples={self.min_child_samples}: LightGBM "
                "could split no leaf and would predict every candidate the same; raise seeds or lower "
                "min_child_samples"
            )
        if self.verify > self.candidates:
            raise ValueError(
                f"verify={self.verify} is more than the {self.candidates} candidates it picks from"
            )
        return self


class SearchSection(Section):
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

    def unused_options(self) -> list[str]:
        """The options of the other strategies' sections set away from their defaults: without
        ``search.strategy``, ``search.grid.divisions=4`` ran the gradient strategy and read nothing of
        it. Not refused, as a recipe may keep several strategies' settings and pick one with
        ``search.strategy=...``: the fit warns. (A written recipe.yaml carries every default.)"""
        unused = []
        for strategy in ("grid", "dirichlet", "cmaes", "spsa", "surrogate"):
            if strategy == self.strategy:
                continue
            for option, value in changed_options(getattr(self, strategy)):
                unused.append(
                    f"search.{strategy}.{option} {value} is not read by search.strategy {self.strategy}"
                )
        return unused
