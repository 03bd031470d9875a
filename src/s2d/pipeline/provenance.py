"""Where the numbers of a run came from: library versions and the machine."""
from __future__ import annotations

import os
import platform
import sys

import accelerate
import numpy
import torch
import transformers

import s2d

__all__ = ["versions", "machine"]


def versions() -> dict[str, str]:
    """Versions of the libraries that produce the numbers."""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "numpy": numpy.__version__, "s2d": s2d.__version__}


def machine() -> dict[str, object]:
    """Platform, CPU count, torch threads and GPUs (if any)."""
    info: dict[str, object] = {"platform": platform.platform(),
                               "processor": platform.processor() or platform.machine(),
                               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
