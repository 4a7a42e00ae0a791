"""Test-session set-up: Triton's interpreter on GPU-less machines, a fixed seed per test.
Helpers shared by the tests live in moe_testing.py."""

import os

import torch

# Without a GPU the triton backend runs in Triton's interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
