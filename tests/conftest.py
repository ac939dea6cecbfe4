"""Make the top-level modules (tmpo.py, tree_sampler.py, ...) importable from the tests; the `gpu` marker."""

import os
import sys

import pytest
import torch

# Every test builds its models offline; a hub lookup would only burn minutes in retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests marked `gpu` (tests/test_gpu.py) run on TMPO_TEST_DEVICE (default cuda) and are skipped when
# that is CUDA and none is visible. benchmarks/gpu_check.py runs them on a GPU, and with
# --device cpu on the CPU, so that their plumbing is tested before a GPU is seen.
TEST_DEVICE = os.environ.get("TMPO_TEST_DEVICE", "cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (runs on TMPO_TEST_DEVICE, default cuda; skipped without CUDA)")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA: run benchmarks/gpu_check.py on a GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def test_device() -> torch.device:
    return torch.device(TEST_DEVICE)
