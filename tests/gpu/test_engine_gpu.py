"""dsparse's DeepSpeed engine on GPUs: the cuSPARSELt backend in bf16 against the reference, 2 GPUs
(NCCL) against 1, and the sync-free step. Run on a GPU machine: `python -m pytest -q -m gpu tests/gpu/test_engine_gpu.py`."""
import json
import os

import pytest
import torch

from launch_utils import ROOT, run
from test_engine import assert_sync_free

WORKER = os.path.join(ROOT, "tests", "workers", "engine_worker.py")
pytestmark = pytest.mark.gpu


def _equivalence(tmp_path, how, backend, ranks=2):
    out = str(tmp_path / f"{how}_{backend}_{ranks}.json")
    run(how, WORKER, ["equivalence", "--out", out, "--bf16", "--backend", backend], ranks=ranks)
    with open(out) as f:
        return json.load(f)


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine_gpu")
    return {b: _equivalence(tmp, "single", b) for b in ("cusparselt", "reference")}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cusparselt_engine_tracks_the_reference_backend_in_bf16(one_gpu, stage):
    fast, ref = one_gpu["cusparselt"][f"stage{stage}_ga1"], one_gpu["reference"][f"stage{stage}_ga1"]
    losses = [[r["loss"] for r in x["rows"]] for x in (fast, ref)]
    assert _rel(*losses) < 2e-2
    assert [r["phase"] for r in fast["rows"]] == [r["phase"] for r in ref["rows"]]
    assert fast["memory"] == ref["memory"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl_match_one(one_gpu, tmp_path):
    two = _equivalence(tmp_path, "deepspeed", "cusparselt")
    assert two["world_size"] == 2
    for key, result in two.items():
        if key == "world_size":
            continue
        one = one_gpu["cusparselt"][key]
        assert _rel([r["loss"] for r in result["rows"]], [r["loss"] for r in one["rows"]]) < 2e-2
        if not key.startswith("stage0"):
            assert result["memory"]["optimizer_state_numel"] < 0.6 * one["memory"]["optimizer_state_numel"]


def test_backward_runs_on_the_calling_thread_unless_configured(tmp_path):
    out = str(tmp_path / "threads.json")
    run("single", WORKER, ["threads", "--out", out], ranks=1)
    with open(out) as f:
        seen = json.load(f)
    assert seen["multithreading0"] == [seen["main"]]
    assert seen["multithreading1"] and seen["main"] not in seen["multithreading1"]


def test_sync_free_step_on_the_gpu(tmp_path):
    """The sync-free ZeRO-1/2 step with CUDA's pinned copy and event: DeepSpeed's losses, NaN steps skipped."""
    out = str(tmp_path / "sync_free.json")
    run("single", WORKER, ["sync_free", "--out", out, "--stages", "1,2"], ranks=1)
    with open(out) as f:
        result = json.load(f)
    for stage in (1, 2):
        assert_sync_free(result[f"stage{stage}"])
