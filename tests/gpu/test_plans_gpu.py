"""Plans on the GPU: tuning picks a correct, measured way; dense plans compute what sparse ones do."""
import pytest
import torch

from dsparse import SparseLinear
from dsparse.backends import plans
from dsparse.backends.cusparselt import skinny_applies
from dsparse.backends.plans import Plan
from dsparse.backends.tuning import split_k_factors_taken, tune_mvue_dw, tune_product, tune_weight_grad

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_plans")]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows, k, tokens", [(768, 768, 4096), (2304, 768, 8192)])
def test_tuning_times_sparse_and_dense_and_keeps_a_sparse_fallback(rows, k, tokens):
    plan, table = tune_product(rows, k, tokens, torch.bfloat16)
    assert any(r["dense"] and "ms" in r for r in table)  # the dense GEMM was a finalist
    assert any((r["alg_id"], r["transpose_result"], r["dense"], r["skinny"]) == (0, False, False, False) and "ms" in r
               for r in table)
    assert not any(r["skinny"] for r in table)  # the few-token kernel is no candidate at thousands of tokens
    assert all(r["split_k"] == 1 for r in table)  # nor is cuSPARSELt's split-k
    best = min(r["ms"] for r in table if "ms" in r)
    chosen = next(r["ms"] for r in table if "ms" in r and r["dense"] == plan.dense
                  and (plan.dense or (r["alg_id"], r["transpose_result"]) == (plan.alg_id, plan.transpose_result)))
    assert chosen == best
    sparse = [r for r in table if not r["dense"] and (r["alg_id"], r["transpose_result"]) ==
              (plan.alg_id, plan.transpose_result)]
    assert sparse and "error" not in sparse[0]  # the fallback algorithm ran correctly


@pytest.mark.parametrize("rows, k", [(2048, 2048), (5632, 2048)])
def test_few_tokens_time_the_skinny_kernel_and_keep_the_fastest_sparse_way(rows, k):
    plan, table = tune_product(rows, k, 8, torch.bfloat16)
    skinny = [r for r in table if r["skinny"]]  # the Triton kernel, then the sparse tensor cores' one
    assert [r["mma"] for r in skinny] == [False, True]
    assert all("error" not in r and "ms" in r for r in skinny)  # their results matched algorithm 0; finalists
    split = [r for r in table if r["split_k"] > 1]  # cuSPARSELt's split-k, checked against algorithm 0 too
    if not split_k_factors_taken(torch.device("cuda")):
        assert not split  # cuSPARSELt refuses the factors from Hopper on: none is offered
    else:
        assert len(split) >= 8 and any("screen_ms" in r for r in split)
    cslt = min((r for r in table if "ms" in r and not (r["dense"] or r["skinny"])), key=lambda r: r["ms"])
    assert (plan.alg_id, plan.split_k, plan.split_k_mode) == (cslt["alg_id"], cslt["split_k"], cslt["split_k_mode"])
    fastest = min(skinny, key=lambda r: r["ms"])
    assert plan.skinny == (fastest["ms"] < cslt["ms"]) and plan.mma == (plan.skinny and fastest["mma"])


def test_a_skinny_plan_runs_a_frozen_layer_as_its_cusparselt_plan_does():
    torch.manual_seed(0)
    layer = SparseLinear(2048, 1024, backend="cusparselt").to("cuda", torch.bfloat16)
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, layer.effective_weight(), layer.bias)
    layer.prepare_inference(release_state=True)
    assert skinny_applies(1024, 2048, torch.bfloat16, x.device)  # else the skinny plan runs cuSPARSELt
    outs = []
    for plan in (Plan(0, False), Plan(0, False, skinny=True), Plan(0, False, skinny=True, mma=True)):
        plans.set_plan("fwd", 8, 2048, 1024, torch.bfloat16, plan)
        outs.append(layer(x))
    assert _rel(outs[0], want) < 1e-2 and _rel(outs[1], outs[0]) < 1e-2 and _rel(outs[2], outs[0]) < 1e-2


def test_an_unseen_shape_is_tuned_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARSE_AUTOTUNE", "1")
    plan = plans.plan_for("fwd", 1000, 768, 3072, torch.bfloat16)
    assert (tmp_path / "plans.json").exists()
    plans.clear_plans()  # a new process: the cache is read, nothing is tuned again
    assert plans.plan_for("fwd", 1024, 768, 3072, torch.bfloat16) == plan


def test_rank_0_answers_a_product_only_another_rank_met_with_a_plan_it_tunes(monkeypatch):
    """``rows_for`` (rank 0's side of ``agree_plans``) tunes a key it has not looked up, on the key's dtype
    name, and sends with it the exact weight gradient's plan its tuning timed (ranks run that one where the
    MVUE plan says ``dense``)."""
    monkeypatch.setenv("DSPARSE_AUTOTUNE", "1")
    key = ("dw_mvue", 1024, 1536, 768, "bfloat16")
    exact = ("dw", *key[1:])
    assert plans.looked_up() == []
    rows = plans.rows_for([key])
    assert [(r["role"], r["tokens"], r["k"], r["n"], r["dtype"]) for r in rows] == [exact, key]
    assert plans.looked_up() == [exact, key]
    plans.clear_plans()
    assert plans.install_rows(rows, "rank 0's plans") == 2
    assert plans.plan_for("dw", 1024, 1536, 768, torch.bfloat16) == Plan.from_row(rows[0])
    assert plans.plan_for("dw_mvue", 1024, 1536, 768, torch.bfloat16) == Plan.from_row(rows[1])


@pytest.mark.parametrize("dense_role", ["fwd", "dx", "both"])
def test_dense_plans_match_the_reference_before_and_after_a_step(dense_role):
    torch.manual_seed(0)
    tokens, inp, out = 512, 768, 1024
    fast = SparseLinear(inp, out, backend="cusparselt").to("cuda", torch.bfloat16)
    ref = SparseLinear(inp, out, backend="reference").to("cuda", torch.bfloat16)
    ref.load_state_dict(fast.state_dict())
    for role, k, n in (("fwd", inp, out), ("dx", out, inp)):
        plans.set_plan(role, tokens, k, n, torch.bfloat16, Plan(0, False, dense=dense_role in (role, "both")))
    for step in range(2):
        x = torch.randn(tokens, inp, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [layer(xi) for layer, xi in zip((fast, ref), xs)]
        assert _rel(*ys) < 1e-2
        for y in ys:
            y.backward(dy)
        assert _rel(xs[0].grad, xs[1].grad) < 1e-2
        with torch.no_grad():  # an optimizer step on both
            for layer in (fast, ref):
                layer.values.add_(layer.values.grad, alpha=-0.5)
                layer.values.grad = None
                layer.on_optimizer_step()


def test_inference_without_training_state_runs_dense_plans_sparse():
    torch.manual_seed(0)
    layer = SparseLinear(768, 768, backend="cusparselt").to("cuda", torch.bfloat16)
    x = torch.randn(256, 768, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, layer.effective_weight(), layer.bias)
    plans.set_plan("fwd", 256, 768, 768, torch.bfloat16, Plan(0, True, dense=True))
    layer.prepare_inference(release_state=True)
    assert layer.values.numel() == 0
    assert _rel(layer(x), want) < 1e-2


def test_weight_gradient_tuning_times_the_fused_tiles_against_cublas_and_gather():
    from kernels.kept_grad import TILES

    plan, table = tune_weight_grad(2048, 2048, 4096, torch.bfloat16)
    assert [r["dw_tile"] for r in table] == ["", *TILES]
    assert "ms" in table[0]  # the unfused way is always a finalist
    fused = table[1:]
    assert any("screen_ms" in r for r in fused), [r.get("error") for r in fused]  # some tile built and was right
    assert plan.dw_tile == min((r for r in table if "ms" in r), key=lambda r: r["ms"])["dw_tile"]


def test_mvue_tuning_times_each_algorithm_whole_against_the_exact_gradient():
    plan, table = tune_mvue_dw(2048, 2048, 4096, torch.bfloat16)
    exact = [r for r in table if r["dense"]]
    assert len(exact) == 1 and "ms" in exact[0]
    mvue = [r for r in table if not r["dense"]]
    assert any("ms" in r for r in mvue) and all("error" not in r for r in mvue if r["alg_id"] == 0)
    best = min((r for r in mvue if "ms" in r), key=lambda r: r["ms"])
    assert plan.alg_id == best["alg_id"] and plan.dense == (exact[0]["ms"] < best["ms"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_fused_weight_gradient_plan_gives_the_unfused_gradient(dtype, monkeypatch):
    monkeypatch.setenv("DSPARSE_AUTOTUNE", "0")  # the other products on algorithm 0: only dW's plan matters here
    torch.manual_seed(0)
    tokens, inp, out = 1000, 768, 1024  # tokens and rows not multiples of the tiles: the masked loads
    layer = SparseLinear(inp, out, backend="cusparselt").to("cuda", dtype)
    x = torch.randn(tokens, inp, device="cuda", dtype=dtype)
    dy = torch.randn(tokens, out, device="cuda", dtype=dtype)
    grads = []
    from kernels.kept_grad import TILES

    tma = next(name for name, c in TILES.items() if c.get("TMA"))
    for plan in (Plan(), Plan(dw_tile="128x256x64_w8_s3"), Plan(dw_tile="128x64x64_w4_s4"), Plan(dw_tile=tma)):
        plans.set_plan("dw", tokens, out, inp, dtype, plan)
        layer(x).backward(dy)
        grads.append(layer.values.grad)
        layer.values.grad = None
    want = (dy.float().t() @ x.float()).gather(1, (torch.arange(inp // 2, device="cuda") // 2 * 4 + layer.idx.long()))
    for grad in grads:
        assert _rel(grad, want) < 5e-3
