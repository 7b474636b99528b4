"""The README's results section is what bench.report renders from the committed bench/results/*.json."""
import os
import shutil

from bench import report

README = os.path.join(report.ROOT, "README.md")


def test_readme_results_are_rendered_from_the_committed_json():
    text = open(README).read()
    block = text.split(report.START, 1)[1].split(report.END, 1)[0]
    assert block.strip() == report.render().strip(), "README is stale: run `python -m bench.report`"


def test_step_profile_chart_draws(tmp_path):
    from bench.plot import plot_profile

    src = os.path.join(report.ROOT, "bench", "results", "engine_h100_profile.json")
    path = shutil.copy(src, tmp_path / "engine_x_profile.json")
    out = plot_profile(str(path))
    assert out.endswith(".png") and os.path.getsize(out) > 10_000


def test_step_merge_pools_repeats_of_a_label(tmp_path):
    """Repeats of one configuration pool into one row: the median over all their steps."""
    import json

    from bench.step import merge

    def row(mode, times, peak):
        return {"mode": mode, "fused": True, "fused_blocks": {"rope": 22}, "autograd_multithreading": False,
                "gpus": 1, "step_s_all": times, "step_s_median": sorted(times)[len(times) // 2],
                "step_s_back_to_back": times[0] * 2, "host_syncs": False,
                "tokens_per_s": 1000 / sorted(times)[len(times) // 2], "peak_memory_gib": peak,
                "environment": {"gpu": "test"}}

    paths = []
    for i, r in enumerate([row("dense", [3, 3, 3], 10), row("dense", [1, 1, 1], 12), row("sparse", [2, 2, 2], 9)]):
        paths.append(str(tmp_path / f"{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    merge(paths, str(tmp_path / "merged.json"))
    merged = json.load(open(tmp_path / "merged.json"))
    dense = merged["runs"]["dense"]
    assert dense["step_s_median"] == 3 and dense["repeat_medians"] == [3, 1] and dense["peak_memory_gib"] == 12
    assert len(dense["step_s_all"]) == 6 and dense["tokens_per_s"] == 1000 / 3
    assert dense["step_s_back_to_back"] == 6  # the median run's
    assert merged["vs_dense"]["sparse"] == {"speedup": 1.5, "memory_ratio": 0.75, "speedup_back_to_back": 1.5}
    paths.append(str(tmp_path / "synced.json"))
    with open(paths[-1], "w") as f:  # a run with DeepSpeed's host syncs is its own label
        json.dump({**row("sparse", [4, 4, 4], 9), "host_syncs": True}, f)
    merge(paths, str(tmp_path / "merged.json"))
    assert json.load(open(tmp_path / "merged.json"))["runs"]["sparse+host-syncs"]["step_s_median"] == 4
    paths.append(str(tmp_path / "apart.json"))
    with open(paths[-1], "w") as f:  # MVUE with gate/up's operand from a pass of its own: its own label, vs dense
        json.dump({**row("sparse", [2.5] * 3, 9), "mvue_dw": True, "swiglu_mvue": False}, f)
    merge(paths, str(tmp_path / "merged.json"))
    assert json.load(open(tmp_path / "merged.json"))["vs_dense"]["sparse+mvue+mvue-apart"]["speedup"] == 3 / 2.5


def test_idle_gaps_merge_streams_and_group_gaps_by_neighbours():
    """Kernels overlapping on two streams count once; each gap is charged to the kernels around it."""
    from bench.common import idle_gaps

    us = 1000
    spans = [(0, 100 * us, "gemm"), (50 * us, 120 * us, "allreduce"),  # overlap: no gap
             (150 * us, 200 * us, "norm"),  # 30 us after allreduce, which ended last
             (210 * us, 260 * us, "gemm"), (262 * us, 300 * us, "norm"),  # 10 us, then 2 us (below min_us)
             (400 * us, 420 * us, "norm")]  # 100 us after norm
    out = idle_gaps(spans, steps=2, min_us=5)
    assert out["span_ms"] == 420 / 1000 / 2
    assert out["idle_ms"] == (30 + 10 + 2 + 100) / 1000 / 2
    gaps = {(g["after"], g["before"]): (g["ms"], g["count"]) for g in out["idle_gaps"]}
    assert gaps == {("norm", "norm"): (0.05, 0.5), ("allreduce", "norm"): (0.015, 0.5), ("norm", "gemm"): (0.005, 0.5)}
    assert [g["after"] for g in out["idle_gaps"]] == ["norm", "allreduce", "norm"]  # largest first
    assert idle_gaps([], steps=1) == {}


def test_layer_table_marks_fused_weight_gradients_and_shows_graphed_steps(monkeypatch):
    speedups = {k: 1.0 for k in ("fwd", "dx", "dw", "step", "dw_mvue", "step_mvue")}

    def row(tokens, fused):
        graphed = {"step_graph": 1.25} if fused else {}  # older rows have no graphed step
        return {"in": 4096, "out": 4096, "tokens": tokens, "dtype": "bf16",
                "speedup_sparse_tuned": {**speedups, **graphed}, "sparse_tuned": {"dw_plan": {"dw_tile": "128x128x64_w8_s4" if fused else ""}}}

    data = {"environment": {"gpu": "test"}, "args": {"autograd_threads": False},
            "rows": [row(4096, True), row(8192, False)]}
    monkeypatch.setattr(report, "_load", lambda pattern: [("layer_test.json", data)] if "layer_" in pattern else [])
    lines = report.layer_table()
    assert any("| 4096 | bf16 |" in line and "1.00x (fused) | 1.00x | 1.25x | 1.00x" in line for line in lines)
    assert any("| 8192 | bf16 |" in line and "| 1.00x | 1.00x | - | 1.00x" in line for line in lines)
    assert any("kernels.weight_grad_kept" in line for line in lines)
    data["rows"][1]["sparse_tuned"]["dw_mvue_plan"] = {"dense": True}  # the MVUE step fell back to the exact dW
    lines = report.layer_table()
    assert any("| 8192 | bf16 |" in line and line.endswith("| 1.00x (exact dW) |") for line in lines)
    assert any("a layer with `mvue_dw` takes the exact one" in line for line in lines)


def test_weight_gradient_table_compares_the_fused_tiles_with_cublas_and_gather(monkeypatch):
    timings = [{"dw_tile": "", "ms": 0.25}, {"dw_tile": "128x256x64_w8_s3", "ms": 0.22},
               {"dw_tile": "128x256x64_w8_s3_tma", "ms": 0.20}, {"dw_tile": "64x128x64_w4_s4", "error": "x"}]
    rows = [{"role": "dw", "tokens": 4096, "k": 4096, "n": 11008, "dtype": "bf16", "default_ms": 0.25,
             "timings": timings},
            {"role": "fwd", "tokens": 4096, "k": 4096, "n": 11008, "dtype": "bf16", "default_ms": 0.1, "timings": []}]
    data = {"environment": {"gpu": "test"}, "products": rows}
    monkeypatch.setattr(report, "_load", lambda pattern: [("tune_test_dw.json", data)] if "tune_" in pattern else [])
    lines = report.weight_grad_table()
    assert "| 11008x4096 | 4096 | bf16 | 0.250 ms | 0.200 ms | 1.25x | 128x256x64_w8_s3_tma |" in lines
    assert sum(line.startswith("| 11008x4096") for line in lines) == 1  # the forward's row is not this table's
    # no tile reached the finals: the screens compare; only errors: none ran
    rows[0]["timings"] = [{"dw_tile": "", "screen_ms": 0.3, "ms": 0.25}, {"dw_tile": "128x256x64_w8_s3", "screen_ms": 0.4},
                          {"dw_tile": "64x128x64_w4_s4", "error": "x"}]
    assert "| 0.400 ms (screen) | 0.75x (screen) | 128x256x64_w8_s3 |" in report.weight_grad_table()[4]
    rows[0]["timings"] = [{"dw_tile": "", "ms": 0.25}, {"dw_tile": "64x128x64_w4_s4", "error": "x"}]
    assert report.weight_grad_table()[4].endswith("| - | - | none ran |")


def test_mvue_gradient_table_shows_which_way_each_product_runs(monkeypatch):
    def row(n, exact_ms, mvue_ms):
        timings = [{"alg_id": 0, "dense": False, "ms": mvue_ms + 0.01}, {"alg_id": 3, "dense": False, "ms": mvue_ms},
                   {"alg_id": 4, "dense": False, "error": "x"}, {"alg_id": 0, "dense": True, "ms": exact_ms}]
        return {"role": "dw_mvue", "tokens": 16384, "k": n, "n": 2048, "dtype": "bf16", "dense_ms": exact_ms,
                "plan": {"alg_id": 3, "dense": exact_ms < mvue_ms}, "timings": timings}

    older = {**row(2048, float("nan"), 0.1), "timings": [{"alg_id": 0, "dense": False, "ms": 0.1}]}
    data = {"environment": {"gpu": "test"}, "products": [row(2560, 0.221, 0.227), row(5632, 0.542, 0.382), older]}
    monkeypatch.setattr(report, "_load", lambda pattern: [("tune_test_dw.json", data)] if "tune_" in pattern else [])
    lines = report.mvue_grad_table()
    assert "| 2048x2560 | 16384 | bf16 | 0.221 ms | 0.227 ms | 0.97x | exact |" in lines
    assert "| 2048x5632 | 16384 | bf16 | 0.542 ms | 0.382 ms | 1.42x | MVUE |" in lines
    assert not any(line.startswith("| 2048x2048") for line in lines)  # timed before the fallback: no exact time
