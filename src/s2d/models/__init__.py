"""Model adapters: load pretrained models for a task and describe their transformer blocks.

* :mod:`s2d.models.loading` — :func:`load` -> :class:`ModelBundle` (model, tokenizer, image preprocessing).
* :mod:`s2d.models.layouts` — :func:`blocks`, :func:`linear_roles`, :func:`head_names`,
  :func:`ffn_modules`: any supported model described by its module names.
* :mod:`s2d.models.wrappers` — timm and SigLIP2 (NaFlex) models behind a Hugging Face classifier's API,
  and :class:`CausalLMClassifier` (a causal LM scored by label-word likelihoods after a prompt).
"""
from s2d.models.layouts import BlockInfo, blocks, colinearity_pairs, ffn_modules, head_names, is_ffn_name, linear_roles
from s2d.models.loading import CAUSAL_LM_FAMILIES, TASKS, ModelBundle, load, with_label_words
from s2d.models.wrappers import CausalLMClassifier, NaFlexClassifier, TimmClassifier

__all__ = ["TASKS", "CAUSAL_LM_FAMILIES", "ModelBundle", "load", "with_label_words", "CausalLMClassifier", "BlockInfo", "blocks", "linear_roles", "head_names", "ffn_modules",
           "is_ffn_name", "colinearity_pairs", "NaFlexClassifier", "TimmClassifier"]
