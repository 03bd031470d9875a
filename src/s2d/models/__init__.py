"""Model adapters: load pretrained models for a task and describe their transformer blocks.

* :mod:`s2d.models.loading` — :func:`load` -> :class:`ModelBundle` (model, tokenizer, image preprocessing).
* :mod:`s2d.models.layouts` — :func:`blocks`, :func:`linear_roles`, :func:`head_names`,
  :func:`ffn_modules`: any supported model described by its module names.
* :mod:`s2d.models.wrappers` — timm and SigLIP2 (NaFlex) models behind a Hugging Face classifier's API.
"""
from s2d.models.layouts import BlockInfo, blocks, ffn_modules, head_names, is_ffn_name, linear_roles
from s2d.models.loading import TASKS, ModelBundle, load
from s2d.models.wrappers import NaFlexClassifier, TimmClassifier

__all__ = ["TASKS", "ModelBundle", "load", "BlockInfo", "blocks", "linear_roles", "head_names", "ffn_modules",
           "is_ffn_name", "NaFlexClassifier", "TimmClassifier"]
