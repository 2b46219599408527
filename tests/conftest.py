"""Test setup: on a machine without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here, before the
test modules import topk_compiler. On a GPU machine the same tests run natively on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton kernels run on CUDA tensors, or on CPU tensors through the interpreter.
KERNEL_DEVICE = DEVICE


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
