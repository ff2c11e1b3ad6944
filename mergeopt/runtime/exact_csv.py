"""pandas' ``read_csv`` with every float parsed exactly, under every pandas mergeopt supports.

Why: a ``grid.csv``, a rank table or a trace is written with each float's shortest repr and must
read back as the same float, or a resumed run, a bit-exact comparison with the grid runs or a
ranking of near-tied mixtures changes in the 17th digit. pandas before 3.1 parses floats to within
a unit in the last place by default (about a third of random doubles come back one ulp off), and
only ``float_precision="round_trip"`` is exact there; pandas 3.1 parses exactly by default and
deprecates that argument (a ``Pandas4Warning`` on every read). So the argument is passed where it
is needed and nowhere else.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _needs_round_trip() -> bool:
    import pandas as pd

    major, minor = (int(part) for part in pd.__version__.split(".")[:2])
    return (major, minor) < (3, 1)


def read_csv(path: Any, **kwargs: Any):
    """``pandas.read_csv(path, **kwargs)``, its floats exactly those written (see the module)."""
    import pandas as pd

    if _needs_round_trip():
        kwargs.setdefault("float_precision", "round_trip")
    return pd.read_csv(path, **kwargs)
