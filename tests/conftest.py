import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
# GPU tests check results, not speed: unseen shapes run on shipped plans or cuSPARSELt's default
# instead of being tuned (seconds each); tests of the tuning turn it back on.
os.environ.setdefault("DSPARSE_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_plans(tmp_path, monkeypatch):
    """No GEMM plans installed, and a private plan cache (``DSPARSE_PLANS``) for the test."""
    from dsparse.backends import plans

    monkeypatch.setenv("DSPARSE_PLANS", str(tmp_path / "plans.json"))
    plans.clear_plans()
    yield
    plans.clear_plans()
