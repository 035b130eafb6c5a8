from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint  # noqa: F401  (re-exported for tests)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names (a checkout "gpu")
            item.add_marker(skip)
