"""The recipe: one typed, frozen schema that holds every default, loaded from YAML with overrides.

A recipe is the whole description of a run. Keeping every default here (and nowhere else) means a
saved ``recipe.yaml`` in a run directory reproduces the run exactly, and a typo in a key is caught
before any model is loaded. Overrides use dotted keys, as in torchtune:
``python -m mergeopt.fit recipes/tiny.yaml optim.lr=0.1 output_dir=/tmp/run``.

One module per recipe section (``model``, ``data``, ``weights``, ``search``, ``objective``, the
real-run sections in ``runs``, ``tracking``), the checks across sections in ``recipe``, and YAML in
``loading``. Everything a caller needs is importable from here.
"""

from mergeopt.config.base import Section, check_name, says_test_split
from mergeopt.config.data import DataSection, DevSetSpec
from mergeopt.config.loading import load_recipe, parse_overrides, recipe_from_dict, recipe_to_yaml
from mergeopt.config.model import MergeSection, ModelSection
from mergeopt.config.objective import ObjectiveSection, ObjectiveTerm
from mergeopt.config.recipe import Recipe
from mergeopt.config.runs import (
    CalibrateSection,
    LoraSection,
    MixtureSetSection,
    RankSection,
    TrainSection,
    WorldSection,
)
from mergeopt.config.search import (
    CmaesSearch,
    DirichletSearch,
    GridSearch,
    OptimSection,
    SearchSection,
    SpsaSearch,
    SurrogateSearch,
)
from mergeopt.config.tracking import LoggingSection
from mergeopt.config.weights import CAP_KEYS, WeightsSection

__all__ = [
    "CAP_KEYS",
    "CalibrateSection",
    "CmaesSearch",
    "DataSection",
    "DevSetSpec",
    "DirichletSearch",
    "GridSearch",
    "LoggingSection",
    "LoraSection",
    "MergeSection",
    "MixtureSetSection",
    "ModelSection",
    "ObjectiveSection",
    "ObjectiveTerm",
    "OptimSection",
    "RankSection",
    "Recipe",
    "SearchSection",
    "Section",
    "SpsaSearch",
    "SurrogateSearch",
    "TrainSection",
    "WeightsSection",
    "WorldSection",
    "check_name",
    "load_recipe",
    "parse_overrides",
    "recipe_from_dict",
    "recipe_to_yaml",
    "says_test_split",
]
