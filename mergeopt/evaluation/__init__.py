"""Evaluation: does the proxy rank mixtures like real runs do? Rank statistics, the grid proxy, ``mergeopt rank``
and ``mergeopt transfer``.
"""
