"""bench.infer's dry run on the CPU (a tiny LLaMA): every variant measured, exported and loaded as on the GPU,
and the result file holds each ratio the README's inference table renders. Speed is not checked here."""
import json
import math
import sys

import pytest

from bench import infer


def test_infer_dry_run_writes_every_variants_ratios(tmp_path, monkeypatch):
    out = tmp_path / "infer_cpu.json"
    monkeypatch.setattr(sys, "argv", ["infer", "--model", "llama-tiny", "--device", "cpu", "--vocab", "256",
                                      "--batch", "2", "--prompt", "32", "--decode_prompt", "8", "--new_tokens", "3",
                                      "--iters", "1", "--ranks", "0,0.0156", "--fold", "on,off", "--fusion", "off",
                                      "--out", str(out)])
    infer.main()
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["dense", "sparse_r0", "sparse_r0.0156", "sparse_r0.0156_added"]
    for r in data["results"].values():  # a step timed by itself (not the difference of the totals)
        assert 0 < r["decode_graph_step_ms"] < r["decode_graph_ms"]
    keys = {"prefill_speedup", "decode_speedup", "decode_graph_speedup", "decode_graph_step_speedup",
            "weight_memory_ratio"}
    for ratios in data["vs_dense"].values():
        assert set(ratios) == keys and all(math.isfinite(v) for v in ratios.values())
    assert data["vs_dense"]["sparse_r0.0156"]["weight_memory_ratio"] > data["vs_dense"]["sparse_r0"]["weight_memory_ratio"]
    assert data["plans"] == []  # the CPU's reference products look no plan up


def test_infer_needs_three_new_tokens_for_a_steps_time(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["infer", "--device", "cpu", "--new_tokens", "2"])
    with pytest.raises(SystemExit):
        infer.main()
