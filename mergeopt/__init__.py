"""mergeopt: choose a fine-tuning data mixture by optimizing the weights of a merge of experts.

θ(w) = θ0 + Σ_i w_i (θ_i − θ0), with w on the simplex, stands in for a model trained on mixture w.
Entry points: ``python -m mergeopt.fit RECIPE``; in Python, :func:`mergeopt.fit.fit` with a
recipe from :func:`mergeopt.config.load_recipe`.
"""

__version__ = "0.1.0"
