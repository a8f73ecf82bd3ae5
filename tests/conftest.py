"""Shared pytest setup: the ``gpu`` marker skips (with the reason) where CUDA is absent."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU here); run tools/gpu_smoke.sh on a GPU node")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
