"""Shared pytest fixtures: deterministic seeds and a bounded thread count for the 2-core CI machine."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny-model tests run on one intra-op thread: on 2 shared cores two contended OpenMP threads are
    up to 10x slower for small tensors. Tests marked `slow` (real models) keep the default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
