"""DoReMi-style domain weights: ``{"train_domain_weights": {...}, "eval_domain_weights": {...}}``.

Followed: sangmichaelxie/doremi (scripts writing ``configs/<run>.json`` as
``{"train_domain_weights": avg_domain_weights_dict, "eval_domain_weights": avg_domain_weights_dict}``
and the data loader reading ``json.load(f)["train_domain_weights"]``, normalizing them). DoReMi
samples domains for packed fixed-length sequences, so the weights are token shares: mergeopt
writes the fitted token shares under both keys, as DoReMi's own scripts do. Domains of weight 0
are kept (DoReMi expects every domain it knows). A ``mergeopt`` key records the source and the
``mergeopt export`` command that writes the file again (and a hierarchical mixture's two levels,
and a budget's epochs over each source); readers that take only the two weight keys ignore it.
"""

from __future__ import annotations

import json

from mergeopt.export.formats.base import Context, Format


def render(ctx: Context) -> str:
    shares = ctx.plan.token_shares
    weights = {n: shares.get(n, 0.0) for n in ctx.mixture.names}
    document = {
        "train_domain_weights": weights,
        "eval_domain_weights": dict(weights),
        "mergeopt": {
            "mixture": str(ctx.mixture.path),
            "written_by": ctx.command(FORMAT),
            "meaning": FORMAT.meaning,
        },
    }
    if ctx.epochs is not None:  # a budget: the epochs over each source, as every format says
        document["mergeopt"]["epochs"] = {
            "per_source": ctx.epochs.per_source,
            "from": ctx.epochs.source,
        }
    if ctx.mixture.groups is not None:  # JSON has no comments: the two levels go in the metadata
        document["mergeopt"]["groups"] = {
            label: {"share": g.share, "within": dict(g.within)} for label, g in ctx.mixture.groups.items()
        }
    return json.dumps(document, indent=2) + "\n"


FORMAT = Format(
    name="doremi",
    filename="doremi_domain_weights.json",
    unit="tokens",
    needs_paths=False,
    meaning="domain weights: each domain's share of training tokens (sum 1).",
    render=render,
)
