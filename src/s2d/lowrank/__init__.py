"""Low-rank structure of a model's Linears (issue: SFSD-LLM, LLM-ROM), imports flowing down this list:

* :mod:`~s2d.lowrank.maths` — the weight-space (SVD) and feature-space (output PCA) rank-r errors of
  one Linear as closed forms over all ranks, and the factors of each construction;
* :mod:`~s2d.lowrank.analysis` — :func:`lowrank_table`, every Linear of a model on calibration data;
* :mod:`~s2d.lowrank.factorise` — a rank budget (:func:`plan_ranks`) applied block by block
  (:func:`factorise_model`): each chosen Linear becomes two smaller Linears.

See docs/lowrank.md.
"""
from s2d.lowrank.analysis import LayerRank, lowrank_table
from s2d.lowrank.factorise import RankPlan, factorise_model, plan_ranks
from s2d.lowrank.maths import RankCurves, feature_factors, rank_curves, smallest_rank, weight_factors

__all__ = ["RankCurves", "rank_curves", "smallest_rank", "weight_factors", "feature_factors", "LayerRank",
           "lowrank_table", "RankPlan", "plan_ranks", "factorise_model"]
