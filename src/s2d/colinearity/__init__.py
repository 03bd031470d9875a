"""Colinearity Decay (CD; Tong et al., arXiv 2605.01330), torch only, imports flowing down this list:

* :mod:`~s2d.colinearity.config` — :class:`CDConfig` and :class:`Pair`;
* :mod:`~s2d.colinearity.penalty` — the pair alignment R, its gradients, the held top singular values;
* :mod:`~s2d.colinearity.hooks` — :class:`ColinearityDecay`, the optimizer hook.

The penalty is derived in docs/colinearity.md (the paper gives no equation).
"""
from s2d.colinearity.config import PAIR_KINDS, CDConfig, Pair
from s2d.colinearity.hooks import ColinearityDecay, PairStats
from s2d.colinearity.penalty import alignment, alignment_ratio, top_alignment

__all__ = ["CDConfig", "Pair", "PAIR_KINDS", "ColinearityDecay", "PairStats", "alignment", "alignment_ratio",
           "top_alignment"]
