"""dsparse on real DeepSpeed (CPU, gloo): 1 rank vs 2 ranks through the deepspeed launcher and mpiexec."""
import json
import math
import os

import pytest

from launch_utils import ROOT, run

WORKER = os.path.join(ROOT, "tests", "workers", "engine_worker.py")
STAGES = [0, 1, 2, 3]
pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario once; results shared by the tests below."""
    tmp = tmp_path_factory.mktemp("engine")
    ckpt = str(tmp / "ckpt")

    def go(how, scenario, *extra, ranks=2):
        out = str(tmp / f"{scenario}_{how}.json")
        run(how, WORKER, [scenario, "--out", out, "--ckpt", ckpt, *extra], ranks=ranks)
        with open(out) as f:
            return json.load(f)

    results = {
        "eq1": go("single", "equivalence"),
        "eq2": go("deepspeed", "equivalence"),
        "eq_mpi": go("mpiexec", "equivalence", "--stages", "2"),
        "resume": go("deepspeed", "resume"),
        "resume_mvue": go("deepspeed", "resume", "--stages", "2", "--mvue_dw"),
        "resume_proj": go("deepspeed", "resume", "--stages", "2", "--mvue_dw", "--projections"),
        "saved": go("deepspeed", "save_for_universal"),
        "fusion": go("deepspeed", "fusion", "--stages", "2,3"),
    }
    from dsparse.checkpoint import to_universal

    for stage in STAGES[1:]:
        to_universal(os.path.join(ckpt, f"uni_stage{stage}"))
    results["universal"] = go("single", "load_universal")
    results["overflow"] = go("deepspeed", "overflow")
    results["sync_free"] = go("deepspeed", "sync_free", "--stages", "1,2")
    results["mismatch"] = go("deepspeed", "mismatch")
    results["plans"] = go("deepspeed", "plans", "--mvue_dw")
    results["plans_mpi"] = go("mpiexec", "plans", "--mvue_dw")
    results["plans_other_gpu"] = go("deepspeed", "plans", "--mvue_dw", "--other_gpu")
    return results


def _losses(rows):
    return [r["loss"] for r in rows]


def _close(a, b, rel):
    return all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("ga", [1, 2])
def test_two_ranks_equal_one_rank_with_twice_the_batch(runs, stage, ga):
    one, two = runs["eq1"][f"stage{stage}_ga{ga}"], runs["eq2"][f"stage{stage}_ga{ga}"]
    assert runs["eq2"]["world_size"] == 2
    assert _close(_losses(two["rows"]), _losses(one["rows"]), 1e-5)
    assert [r["checksum"] for r in two["rows"]] == [r["checksum"] for r in one["rows"]]  # same masks
    assert len({tuple(r["checksum"]) for r in one["rows"]}) > 2  # the W̃ᵀ masks did change
    assert [r["phase"] for r in one["rows"]] == ["sparse"] * 4 + ["adapters"] * 4
    assert all(r["applied"] for r in one["rows"])


@pytest.mark.parametrize("stage", [2, 3])
def test_fused_kernels_train_like_the_hf_modules(runs, stage):
    """The fused RMSNorm, SwiGLU and RoPE (ZeRO-3: with partitioned norm weights), and under ZeRO-2 q/k/v and
    gate/up as one product each, give HF's losses."""
    plain, fused = runs["fusion"][f"stage{stage}_fused0"], runs["fusion"][f"stage{stage}_fused1"]
    assert set(plain["fused"].values()) == {0}
    assert fused["fused"].pop("projections") == (0 if stage == 3 else 4) and 0 not in fused["fused"].values()
    # DeepSpeed's flat parameter buffers keep each group's values back to back: their stack is a view
    assert fused["values_stacked_in_place"] == [True] * (0 if stage == 3 else 4)
    if stage == 3:  # grouping by hand is refused with the reason and the fix
        assert "partitioned by ZeRO-3" in fused["refused"] and "ZeRO-1/2 only" in fused["refused"]
    kernels = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_silu_mul_fwd_kernel", "_silu_mul_bwd_kernel",
               "_rope_kernel"}
    assert kernels <= set(fused["launches"]) and not kernels & set(plain["launches"])
    assert _close(fused["losses"], plain["losses"], 1e-4), (fused["losses"], plain["losses"])


def test_mpiexec_path_matches(runs):
    assert runs["eq_mpi"]["world_size"] == 2
    assert _close(_losses(runs["eq_mpi"]["stage2_ga1"]["rows"]), _losses(runs["eq1"]["stage2_ga1"]["rows"]), 1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_state_is_kept_size_and_halves_with_two_ranks(runs, stage):
    one, two = runs["eq1"][f"stage{stage}_ga1"], runs["eq2"][f"stage{stage}_ga1"]
    mem1, mem2 = one["memory"], two["memory"]
    trainable = one["trainable_numel"]
    assert trainable == mem1["sparse_values_numel"] + mem1["dense_params_numel"]
    assert mem1["sparse_values_numel"] * 2 == mem1["dense_equivalent_numel"]
    # AdamW: fp32 master (separate from the params under ZeRO) + two moments, at the kept size
    per_param = 2 if stage == 0 else 3
    assert per_param * trainable <= mem1["optimizer_state_numel"] <= per_param * trainable + 64
    if stage == 0:
        assert mem2["optimizer_state_numel"] == mem1["optimizer_state_numel"]
    else:
        assert abs(mem2["optimizer_state_numel"] - mem1["optimizer_state_numel"] / 2) <= 64


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_reduction_moves_the_kept_values_only(runs, stage):
    rows = runs["eq2"][f"stage{stage}_ga1"]["rows"]
    mem = runs["eq2"][f"stage{stage}_ga1"]["memory"]
    reduced = sum(rows[0]["grad_bytes"].values())
    trainable = runs["eq2"][f"stage{stage}_ga1"]["trainable_numel"]
    idle_adapters = runs["eq2"][f"stage{stage}_ga1"]["adapter_numel"]  # no gradient before they start
    # fp32 gradients of the kept values and dense parameters (ZeRO-1-3 skip the idle adapters)
    assert 4 * (trainable - idle_adapters) <= reduced <= 4 * trainable + 64
    dense_model = trainable + mem["dense_equivalent_numel"] - mem["sparse_values_numel"]
    assert reduced < 4 * dense_model


@pytest.mark.parametrize("stage", STAGES)
def test_resume_gives_identical_next_steps_also_across_the_adapter_switch(runs, stage):
    result = runs["resume"][f"stage{stage}"]
    full = _losses(result["full"])
    for resumed in result["resumed"]:
        assert resumed["client_step"] == resumed["k"]
        assert _losses(resumed["rows"]) == full[resumed["k"]:]


def test_mvue_weight_gradients_train_differently_and_resume_exactly(runs):
    result = runs["resume_mvue"]["stage2"]
    full = _losses(result["full"])
    assert full != _losses(runs["resume"]["stage2"]["full"])  # the flag reaches the layers
    assert all(math.isfinite(loss) for loss in full)
    for resumed in result["resumed"]:  # the draws depend on (layer, step, micro-batch) only
        assert _losses(resumed["rows"]) == full[resumed["k"]:]


def test_grouped_projections_train_and_resume_exactly(runs):
    """q/k/v and gate/up grouped (with MVUE weight gradients drawn over each group's stacked dY): a resumed
    run continues bit for bit, across a mask change and the adapter switch."""
    result = runs["resume_proj"]["stage2"]
    assert result["projection_groups"] == 4 and runs["resume_mvue"]["stage2"]["projection_groups"] == 0
    full = _losses(result["full"])
    assert all(math.isfinite(loss) for loss in full)
    assert _close(full, _losses(runs["resume_mvue"]["stage2"]["full"]), 0.05)  # other draws, the same training
    for resumed in result["resumed"]:
        assert _losses(resumed["rows"]) == full[resumed["k"]:]


@pytest.mark.parametrize("stage", STAGES)
def test_two_rank_checkpoint_resumes_on_one_rank(runs, stage):
    two = _losses(runs["saved"][f"stage{stage}"]["rows"])[4:]
    one = _losses(runs["universal"][f"stage{stage}"]["rows"])
    assert one[0] == pytest.approx(two[0], rel=1e-6)  # parameters restored exactly
    # ZeRO-3's universal load in DeepSpeed 0.19.8 restores the Adam moments approximately
    assert _close(one, two, 1e-5 if stage < 3 else 1e-2)


@pytest.mark.parametrize("stage", STAGES)
def test_non_finite_gradients_skip_the_step_for_dense_and_sparse_alike(runs, stage):
    result = runs["overflow"][f"stage{stage}"]
    (row,) = result["rows"]
    assert not row["applied"] and row["mask_step"] == 2  # the sparse schedule did not advance
    assert result["skipped_steps"] == 1 and result["lr_unchanged"]
    if stage != 3:
        assert result["unchanged"]
    assert result["next"][0]["applied"] and result["next"][0]["mask_step"] == 3


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_zero_checks_match_deepspeeds_loops(runs, stage):
    """The fused inf/NaN check and L2 norm (dsparse.zero_checks) give DeepSpeed's answers, per rank's
    partition: a clean backward, then one inf entry, which both flag and which skips the step."""
    result = runs["overflow"][f"stage{stage}"]["fused_checks"]
    assert result["optimizer"] == "FusedChecksZeroOptimizer"
    assert max(deepspeed for _, deepspeed in result["norms"]) > 0  # (the idle adapters' group has none)
    for fused, deepspeed in result["norms"]:
        assert abs(fused - deepspeed) <= 1e-5 * deepspeed
    assert result["overflow_clean"] == [[0.0, 0.0]]
    assert result["overflow_inf"] == [[1.0, 1.0]]
    assert [-1.0, -1.0] in result["norms_inf"]  # DeepSpeed's inf marker, in the inf's group
    for fused, deepspeed in result["norms_inf"]:
        assert abs(fused - deepspeed) <= 1e-5 * abs(deepspeed)
    assert result["skipped"] == 1


@pytest.mark.parametrize("stage", [1, 2])
def test_sync_free_step_trains_identically_and_skips_non_finite_steps_on_the_device(runs, stage):
    """bf16 + fused AdamW: no host check, the same losses as DeepSpeed's host-checked step; a NaN step
    leaves parameters and Adam's step counts as they were, and is counted one step later."""
    assert_sync_free(runs["sync_free"][f"stage{stage}"])


def assert_sync_free(result: dict) -> None:
    """What the ``sync_free`` scenario must show (also on GPUs: tests/gpu/test_engine_gpu.py)."""
    assert result["device_skip"] == [False, True]
    assert _losses(result["free"]) == _losses(result["host"])
    assert result["unchanged"] and result["adam_steps_unchanged"]
    assert result["skipped"] == [1, 0]  # counted by dsparse; DeepSpeed never saw it
    assert math.isfinite(result["next"][0]["loss"]) and result["changed_after"]
    assert result["clip"] == [True] * 4


def test_checkpoint_of_another_sparsity_config_is_refused(runs):
    error = runs["mismatch"]["error"]
    assert error and "another sparsity configuration" in error
    assert "down_proj': pattern '2:4' in the checkpoint vs '2:8' here" in error


@pytest.mark.parametrize("launcher", ["plans", "plans_mpi"])
def test_ranks_run_rank_0s_plans_from_their_second_step(runs, launcher):
    """Rank 1's own plans fall back to the exact weight gradient everywhere, rank 0's nowhere: after the
    first optimizer step both run rank 0's (MVUE), and training goes on (deepspeed launcher and mpiexec)."""
    ranks, rows = runs[launcher]["ranks"], runs[launcher]["rows"]
    count = len(ranks[0]["before"])
    assert count == 14  # q, k, v, o, gate, up, down in each of the two blocks
    assert ranks[0]["before"] == [False] * count and ranks[1]["before"] == [True] * count
    assert ranks[0]["after"] == ranks[1]["after"] == [False] * count
    assert all(math.isfinite(r["loss"]) and r["applied"] for r in rows)


def test_a_rank_on_another_gpu_keeps_its_own_plans(runs):
    """Algorithm ids and timings mean other kernels on another GPU or cuSPARSELt version: no rank takes
    another's plans then, and training goes on."""
    ranks, rows = runs["plans_other_gpu"]["ranks"], runs["plans_other_gpu"]["rows"]
    assert ranks[0]["after"] == ranks[0]["before"] == [False] * 14
    assert ranks[1]["after"] == ranks[1]["before"] == [True] * 14
    assert all(math.isfinite(r["loss"]) and r["applied"] for r in rows)
