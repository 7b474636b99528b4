"""Kernel tests: on CPU through the Triton interpreter, on CUDA compiled (when a GPU is visible).

TRITON_INTERPRET is set before triton is first imported when no GPU is visible (as the
triton docs ask). The kernels do not depend on it: ``kernels._triton.DualKernel`` runs
CPU tensors through the interpreter either way, so import order cannot break these tests.
"""
import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # `pytest kernels` without an installed package
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d
                                        for d in DEVICES])
