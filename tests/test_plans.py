"""Plan lookup, caching and the dense-fallback flag (the parts that need no GPU)."""
import json

import pytest
import torch

from dsparse.backends import plans
from dsparse.backends.plans import DEFAULT_PLAN, Plan
from kernels.kept_grad import TILES

pytestmark = pytest.mark.usefixtures("fresh_plans")


def test_a_plan_serves_token_counts_within_a_factor_of_two():
    tuned = Plan(17, True)
    plans.set_plan("fwd", 8192, 4096, 11008, torch.bfloat16, tuned)
    for tokens in (4096, 5000, 8192, 16384):
        assert plans.plan_for("fwd", tokens, 4096, 11008, torch.bfloat16) == tuned
    # out of reach, another role, shape or dtype: not this plan (and no GPU here to tune one)
    assert plans.plan_for("fwd", 2048, 4096, 11008, torch.bfloat16) == DEFAULT_PLAN
    assert plans.plan_for("fwd", 32768, 4096, 11008, torch.bfloat16) == DEFAULT_PLAN
    assert plans.plan_for("dx", 8192, 4096, 11008, torch.bfloat16) == DEFAULT_PLAN
    assert plans.plan_for("fwd", 8192, 4096, 4096, torch.bfloat16) == DEFAULT_PLAN
    assert plans.plan_for("fwd", 8192, 4096, 11008, torch.float16) == DEFAULT_PLAN


def test_the_nearest_tuned_token_count_wins():
    plans.set_plan("dx", 4096, 1024, 2048, torch.float16, Plan(3, True))
    plans.set_plan("dx", 16384, 1024, 2048, torch.float16, Plan(6, False))
    assert plans.plan_for("dx", 6000, 1024, 2048, torch.float16) == Plan(3, True)
    assert plans.plan_for("dx", 12000, 1024, 2048, torch.float16) == Plan(6, False)


def test_installing_a_plan_replaces_earlier_choices():
    assert plans.plan_for("fwd", 8192, 768, 768, torch.bfloat16) == DEFAULT_PLAN
    plans.set_plan("fwd", 8192, 768, 768, torch.bfloat16, Plan(4, True, dense=True))
    assert plans.plan_for("fwd", 8192, 768, 768, torch.bfloat16) == Plan(4, True, dense=True)


def test_default_plans_only_overrides_tuned_plans_inside_the_block():
    plans.set_plan("fwd", 8192, 768, 768, torch.bfloat16, Plan(4, True))
    with plans.default_plans_only():
        assert plans.plan_for("fwd", 8192, 768, 768, torch.bfloat16) == DEFAULT_PLAN
    assert plans.plan_for("fwd", 8192, 768, 768, torch.bfloat16) == Plan(4, True)


def test_plans_round_trip_through_json_with_the_dense_and_skinny_flags(tmp_path):
    plans.set_plan("fwd", 8192, 768, 3072, torch.bfloat16, Plan(6, True, dense=True))
    plans.set_plan("dx", 8192, 3072, 768, torch.bfloat16, Plan(17, True))
    plans.set_plan("fwd", 8, 768, 3072, torch.bfloat16, Plan(3, True, dense=True, skinny=True))
    plans.set_plan("fwd", 8, 3072, 768, torch.bfloat16, Plan(2, True, skinny=True, mma=True))
    plans.set_plan("fwd", 8, 2048, 2560, torch.bfloat16, Plan(0, True, split_k=4, split_k_mode=2))
    tile = next(iter(TILES))
    plans.set_plan("dw", 4096, 4096, 4096, torch.bfloat16, Plan(dw_tile=tile))
    path = tmp_path / "saved.json"
    plans.save_plans(path)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    plans.clear_plans()
    assert plans.load_plans(path) == 6
    assert plans.plan_for("fwd", 8192, 768, 3072, torch.bfloat16) == Plan(6, True, dense=True)
    assert plans.plan_for("dx", 8192, 3072, 768, torch.bfloat16) == Plan(17, True)
    assert plans.plan_for("fwd", 8, 768, 3072, torch.bfloat16) == Plan(3, True, dense=True, skinny=True)
    assert plans.plan_for("fwd", 8, 3072, 768, torch.bfloat16) == Plan(2, True, skinny=True, mma=True)
    assert plans.plan_for("fwd", 8, 2048, 2560, torch.bfloat16) == Plan(0, True, split_k=4, split_k_mode=2)
    assert plans.plan_for("dw", 4096, 4096, 4096, torch.bfloat16) == Plan(dw_tile=tile)


def test_plan_files_from_before_the_dense_and_skinny_flags_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps([{"role": "fwd", "tokens": 8192, "k": 2048, "n": 2048, "dtype": "bfloat16",
                                 "alg_id": 20, "transpose_result": True}]))
    plans.load_plans(path)
    assert plans.plan_for("fwd", 8192, 2048, 2048, torch.bfloat16) == Plan(20, True, dense=False, skinny=False,
                                                                            split_k=1, split_k_mode=0, dw_tile="")


def test_chosen_lists_every_product_looked_up_with_its_plan():
    plans.set_plan("dw", 8192, 2048, 5632, torch.bfloat16, Plan(dw_tile=next(iter(TILES))))
    plans.plan_for("dw", 8192, 2048, 5632, torch.bfloat16)
    plans.plan_for("fwd", 8192, 2048, 5632, torch.bfloat16)  # untuned here (no GPU): the default plan
    rows = {row["role"]: row for row in plans.chosen()}
    assert rows["dw"]["dw_tile"] == next(iter(TILES)) and rows["dw"]["dtype"] == "bfloat16"
    assert Plan.from_row(rows["fwd"]) == DEFAULT_PLAN and (rows["fwd"]["tokens"], rows["fwd"]["k"]) == (8192, 2048)


def test_another_ranks_rows_replace_this_ones_plans_at_the_products_it_looked_up():
    """What :func:`dsparse.distributed.agree_plans` moves between ranks: the keys each looked up (surviving
    the memo's reset when a plan is installed), rank 0's rows for them, installed over this rank's own."""
    plans.set_plan("dw_mvue", 16384, 2560, 2048, torch.bfloat16, Plan(5))  # "rank 0"'s plan
    plans.plan_for("dw_mvue", 16384, 2560, 2048, torch.bfloat16)
    plans.plan_for("fwd", 16384, 2048, 2560, torch.bfloat16)
    plans.set_plan("fwd", 1024, 64, 64, torch.float32, Plan(1))  # resets the memo; the keys stay looked up
    keys = plans.looked_up()
    assert keys == [("dw_mvue", 16384, 2560, 2048, "bfloat16"), ("fwd", 16384, 2048, 2560, "bfloat16")]
    rows = plans.rows_for(keys)
    plans.clear_plans()  # "rank 1": its own timing fell back to the exact gradient
    plans.set_plan("dw_mvue", 16384, 2560, 2048, torch.bfloat16, Plan(2, dense=True))
    assert not plans.mvue_pays(16384, 2560, 2048, torch.bfloat16)
    assert plans.install_rows(rows, "rank 0's plans") == 2
    assert plans.plan_for("dw_mvue", 16384, 2560, 2048, torch.bfloat16) == Plan(5)
    assert plans.plan_for("fwd", 16384, 2048, 2560, torch.bfloat16) == DEFAULT_PLAN


def test_a_weight_gradient_plan_on_a_tile_this_version_lacks_is_left_out(tmp_path, caplog):
    path = tmp_path / "other_version.json"
    rows = [{"role": "dw", "tokens": 8192, "k": 2048, "n": 2048, "dtype": "bfloat16", "dw_tile": name}
            for name in ("512x512x8_w1_s9", next(iter(TILES)))]
    path.write_text(json.dumps(rows))
    assert plans.load_plans(path) == 1
    assert "512x512x8_w1_s9" in caplog.text and "tuned again on first use" in caplog.text
    assert plans.plan_for("dw", 8192, 2048, 2048, torch.bfloat16) == Plan(dw_tile=next(iter(TILES)))


def test_the_shipped_h100_plans_parse():
    import glob
    import os

    files = glob.glob(os.path.join(plans.TUNED_DIR, "plans_*.json"))
    assert files
    for path in files:
        assert plans.load_plans(path) > 0


def test_the_shipped_plans_hold_each_products_newest_tuning():
    """What ``bench.tune`` picked (``bench/results/tune_<gpu>*.json``; files of earlier sessions end in
    ``_s<session>``) is what the shipped plans run: a stale row once sent a decoding step's 5632 → 2048
    product to cuSPARSELt's 37 µs kernel instead of the 14 µs one its tuning chose."""
    import glob
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tunings = [f for f in glob.glob(os.path.join(root, "bench", "results", "tune_h*.json"))
               if not re.search(r"_s\d+\.json$", f)]
    assert tunings
    dtypes = {"bf16": "bfloat16", "fp16": "float16"}
    for path in tunings:
        gpu = os.path.basename(path).split("_")[1].removesuffix(".json")
        shipped = glob.glob(os.path.join(plans.TUNED_DIR, f"plans_NVIDIA_{gpu.upper()}*.json"))
        assert len(shipped) == 1, (path, shipped)
        with open(shipped[0]) as f:
            rows = {(r["role"], r["tokens"], r["k"], r["n"], r["dtype"]): Plan.from_row(r) for r in json.load(f)}
        with open(path) as f:
            for p in json.load(f)["products"]:
                key = (p["role"], p["tokens"], p["k"], p["n"], dtypes[p["dtype"]])
                assert rows.get(key) == Plan.from_row(p["plan"]), (os.path.basename(path), key)


@pytest.mark.parametrize("tokens, bucket", [(1, 8), (8, 8), (9, 16), (4096, 4096), (5000, 8192)])
def test_new_plans_are_tuned_at_power_of_two_token_buckets(tokens, bucket):
    assert plans._bucket(tokens) == bucket


def test_autotuning_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("DSPARSE_AUTOTUNE", raising=False)
    assert plans.autotune_enabled()
    monkeypatch.setenv("DSPARSE_AUTOTUNE", "0")
    assert not plans.autotune_enabled()
    monkeypatch.setenv("DSPARSE_AUTOTUNE", "1")
    assert plans.autotune_enabled()


@pytest.mark.parametrize("flag, value", [("--roles", "fwd,dW"), ("--dtypes", "bf16,fp32")])
def test_bench_tune_refuses_unknown_roles_and_dtypes_before_tuning(monkeypatch, capsys, flag, value):
    import sys

    from bench import tune

    monkeypatch.setattr(sys, "argv", ["tune", flag, value])
    with pytest.raises(SystemExit):
        tune.main()
    assert f"{flag}: unknown" in capsys.readouterr().err
