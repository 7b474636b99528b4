"""The cached-plan cuSPARSELt binding == torch._cslt_sparse_mm (run on a GPU)."""
import threading
import time

import pytest
import torch

from dsparse.backends import cslt_binding
from dsparse.backends.cusparselt import _sparse_mm
from dsparse.backends.plans import Plan
from dsparse.backends.tuning import split_k_factors_taken

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [(64, 128, 8), (256, 512, 77), (1024, 4096, 1001), (4096, 1024, 512)]  # rows of A, k, tokens
TUNED_ALG = {torch.bfloat16: 17, torch.float16: 6}  # fast on an H100 with cuSPARSELt 0.8


def _compressed(rows, k, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(rows, k // 4, 4, generator=gen, device="cuda")
    keep = torch.zeros_like(w).scatter_(-1, w.abs().topk(2, dim=-1).indices, 1.0)
    return torch._cslt_compress((w * keep).view(rows, k).to(dtype))


def _torch_mm(packed, x, bias, plan):
    """What ``_sparse_mm`` computed before the binding: padded tokens, torch's op."""
    pad = (-x.shape[0]) % 8
    dense = torch.nn.functional.pad(x, (0, 0, 0, pad))
    out = torch._cslt_sparse_mm(packed, dense.t(), bias=bias, transpose_result=plan.transpose_result,
                                alg_id=plan.alg_id)
    return (out if plan.transpose_result else out.t())[: x.shape[0]]


def _assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 1e-3, rel


@pytest.mark.parametrize("dtype", DTYPES)
def test_binding_is_available(dtype):
    assert cslt_binding.unavailable_reason(dtype, torch.device("cuda")) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_alg_count_covers_tuned_algorithm(dtype):
    for transpose in (False, True):
        assert cslt_binding.alg_count(4096, 4096, 8192, dtype, transpose) > TUNED_ALG[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, k, tokens", SHAPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch(dtype, rows, k, tokens, transpose, with_bias):
    packed = _compressed(rows, k, dtype)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    bias = torch.randn(rows, device="cuda", dtype=dtype) if with_bias else None
    for alg in (0, TUNED_ALG[dtype]):
        plan = Plan(alg, transpose)
        try:
            want = _torch_mm(packed, x, bias, plan)
        except RuntimeError:  # an algorithm this shape does not support: the binding refuses it too
            with pytest.raises(RuntimeError):
                _sparse_mm(packed, x, bias, plan)
            continue
        got = _sparse_mm(packed, x, bias, plan)
        assert got.is_contiguous()
        _assert_same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, k, tokens", [(2048, 2048, 8), (2048, 5632, 16), (11264, 2048, 8)])
def test_split_k_plans_compute_algorithm_0s_product(dtype, rows, k, tokens):
    """cuSPARSELt's split-k (the reduction split in the product's kernel, mode 1, or in a second kernel,
    mode 2) gives algorithm 0's result up to the order of its sums; with a bias, and in place of a plan
    without split-k for the same algorithm (separate cached plans). From Hopper on cuSPARSELt refuses
    the factors, and the binding says so (tuning then offers none: ``tuning.split_k_factors_taken``)."""
    packed = _compressed(rows, k, dtype)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    bias = torch.randn(rows, device="cuda", dtype=dtype)
    refused = not split_k_factors_taken(x.device)
    for b in (None, bias):
        want = _torch_mm(packed, x, b, Plan(0, True))
        for split in (2, 4, 8):
            for mode in (1, 2):
                plan = Plan(0, True, split_k=split, split_k_mode=mode)
                if refused:
                    with pytest.raises(RuntimeError, match="cusparseLtMatmulAlgSetAttribute"):
                        _sparse_mm(packed, x, b, plan)
                else:
                    _assert_same(_sparse_mm(packed, x, b, plan), want)
        _assert_same(_sparse_mm(packed, x, b, Plan(0, True)), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_and_operands_follow_each_call(dtype):
    """One cached plan, new tensors (other addresses) at every call."""
    plan = Plan(0, True)
    for seed in range(3):
        packed = _compressed(512, 256, dtype, seed)
        x = torch.randn(64, 256, device="cuda", dtype=dtype)
        bias = torch.randn(512, device="cuda", dtype=dtype)
        _assert_same(_sparse_mm(packed, x, bias, plan), _torch_mm(packed, x, bias, plan))


class _SparseLinearFn(torch.autograd.Function):
    """y = x Wᵀ in forward, dx = dy W in backward: both through ``_sparse_mm`` (backward on autograd's thread)."""

    @staticmethod
    def forward(ctx, x, packed, packed_t, plan, threads):
        ctx.packed_t, ctx.plan, ctx.threads = packed_t, plan, threads
        return _sparse_mm(packed, x, None, plan)

    @staticmethod
    def backward(ctx, dy):
        ctx.threads.append(threading.get_ident())
        return _sparse_mm(ctx.packed_t, dy.contiguous(), None, ctx.plan), None, None, None, None


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_thread(dtype):
    out_f, in_f, tokens = 256, 512, 100
    gen = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(out_f, in_f // 4, 4, generator=gen, device="cuda")
    w = (w * torch.zeros_like(w).scatter_(-1, w.abs().topk(2, dim=-1).indices, 1.0)).view(out_f, in_f)
    wt = w.t().reshape(in_f, out_f // 4, 4)  # prune Wᵀ along out for the input gradient
    wt = (wt * torch.zeros_like(wt).scatter_(-1, wt.abs().topk(2, dim=-1).indices, 1.0)).view(in_f, out_f)
    packed, packed_t = torch._cslt_compress(w.to(dtype)), torch._cslt_compress(wt.to(dtype))
    plan, threads = Plan(TUNED_ALG[dtype], True), []
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=dtype)
    y = _SparseLinearFn.apply(x, packed, packed_t, plan, threads)
    y.backward(dy)
    assert threads and threads[0] != threading.get_ident()
    _assert_same(y.detach(), _torch_mm(packed, x.detach(), None, plan))
    _assert_same(x.grad, _torch_mm(packed_t, dy, None, plan))


def _host_us(fn, calls):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6, (time.perf_counter() - start) / calls * 1e6


@pytest.mark.parametrize("m, k, tokens", [(4096, 4096, 8192), (4096, 4096, 2048)])
def test_host_time_per_call(m, k, tokens):
    """Prints host and wall microseconds per eager call, binding vs torch (no timing asserted)."""
    dtype, plan = torch.bfloat16, Plan(17, True)
    packed = _compressed(m, k, dtype)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    binding = _host_us(lambda: cslt_binding.sparse_mm(packed, x, None, True, 17), 200)
    torch_op = _host_us(lambda: torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, alg_id=17), 200)
    via_backend = _host_us(lambda: _sparse_mm(packed, x, None, plan), 200)
    w = torch.randn(m, k, device="cuda", dtype=dtype)
    dense = _host_us(lambda: torch.nn.functional.linear(x, w), 200)
    print(f"\n{m}x{k}x{tokens} bf16 alg 17 transposed, us/call host (wall incl. GPU): "
          f"binding {binding[0]:.1f} ({binding[1]:.1f}), _sparse_mm {via_backend[0]:.1f} ({via_backend[1]:.1f}), "
          f"torch._cslt_sparse_mm {torch_op[0]:.1f} ({torch_op[1]:.1f}), dense F.linear {dense[0]:.1f} "
          f"({dense[1]:.1f})")
