"""Post-training quantization methods; importing this package registers them with ``s2d.quant.api``.

- :mod:`~s2d.quant.ptq.rtn` — round to nearest with min-max (or percentile / MSE) ranges, the baseline;
- :mod:`~s2d.quant.ptq.ptq4vit` — PTQ4ViT: twin-uniform quantizers, Hessian-guided scale search;
- :mod:`~s2d.quant.ptq.repq` — RepQ-ViT: scale reparameterisation of post-LN activations, log-√2 softmax;
- :mod:`~s2d.quant.ptq.erq` — ERQ: RepQ-ViT's quantizers plus ridge-regression error reduction;
- :mod:`~s2d.quant.ptq.common` — input capture, Linear groups and the quantile/MSE range search they share.

Only the config classes are re-exported: the method functions share their modules' names (``rtn``,
``repq``, ...) and would shadow the submodules here.
"""
from s2d.quant.ptq.erq import ERQConfig
from s2d.quant.ptq.ptq4vit import PTQ4ViTConfig
from s2d.quant.ptq.repq import RepQConfig
from s2d.quant.ptq.rtn import RTNConfig

__all__ = ["RTNConfig", "PTQ4ViTConfig", "RepQConfig", "ERQConfig"]
