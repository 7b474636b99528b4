"""cuSPARSELt backend == reference backend on LLM-like shapes (run on a GPU)."""
import pytest
import torch

from dsparse import SparseLinear
from dsparse.backends import cusparselt as cslt

pytestmark = pytest.mark.gpu

SHAPES = [(512, 1024, 2816), (1000, 4096, 4096), (2048, 4096, 1024)]  # tokens, in, out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pair(inp, out, dtype, **kwargs):
    torch.manual_seed(0)
    fast = SparseLinear(inp, out, backend="cusparselt", **kwargs).to("cuda", dtype)
    ref = SparseLinear(inp, out, backend="reference", **kwargs).to("cuda", dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _check(fast, ref, tokens, dtype, tol=1e-2):
    x = torch.randn(tokens, fast.in_features, device="cuda", dtype=dtype)
    dy = torch.randn(tokens, fast.out_features, device="cuda", dtype=dtype)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [layer(xi) for layer, xi in zip((fast, ref), xs)]
    assert ys[0].is_contiguous() and ys[0].shape == ys[1].shape
    assert _rel(ys[0], ys[1]) < tol
    for y in ys:
        y.backward(dy)
    assert _rel(xs[0].grad, xs[1].grad) < tol
    assert _rel(fast.values.grad, ref.values.grad) < tol
    assert _rel(fast.bias.grad, ref.bias.grad) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, inp, out", SHAPES)
def test_cusparselt_matches_reference(tokens, inp, out, dtype):
    fast, ref = _pair(inp, out, dtype)
    _check(fast, ref, tokens, dtype)


def test_compressed_layout_allows_in_place_refresh():
    assert cslt._inplace_layout_ok(torch.bfloat16, torch.device("cuda"))
    assert cslt._inplace_layout_ok(torch.float16, torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_refresh_after_steps_and_mask_changes_and_zero_values(dtype):
    """Operands refreshed in place after steps and mask changes equal freshly built ones."""
    fast, ref = _pair(1024, 1024, dtype, mask_change_freq=2)
    opt = torch.optim.SGD(fast.parameters(), lr=0.05)
    for step in range(5):
        x = torch.randn(256, 1024, device="cuda", dtype=dtype)
        fast(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 2:  # kept values that are exactly zero must stay in their slots
            with torch.no_grad():
                fast.values[:, ::3] = 0
        ref.load_state_dict(fast.state_dict())
        _check(fast, ref, 256, dtype)
        for layer in (fast, ref):
            layer.zero_grad()
    assert fast.step == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_fused_add_matches_float64(dtype):
    torch.manual_seed(0)
    layer = SparseLinear(1024, 2048, backend="cusparselt").to("cuda", dtype)
    layer.add_adapter(16, alpha=2.0)
    with torch.no_grad():
        layer.adapter_b.normal_()
    x = torch.randn(4, 64, 1024, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    params = [p.detach().double().requires_grad_() for p in (layer.adapter_a, layer.adapter_b)]
    xd = x.detach().double().requires_grad_()
    ref = (torch.nn.functional.linear(xd, layer.effective_weight().detach().double(), layer.bias.detach().double())
           + (xd @ params[0].t()) @ params[1].t() * (2.0 / 16))
    assert _rel(y, ref) < 1e-2
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    assert _rel(layer.adapter_a.grad, params[0].grad) < 2e-2
    assert _rel(layer.adapter_b.grad, params[1].grad) < 2e-2


@pytest.mark.parametrize("tokens, out", [(512, 2816), (1000, 2816), (512, 2832)])  # 2832: cuSPARSELt compresses
def test_mvue_weight_gradient_as_a_sparse_gemm_matches_the_reference(tokens, out):
    fast, ref = _pair(1024, out, torch.bfloat16, mvue_dw=True)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
    for layer in (fast, ref):
        layer(x).backward(dy)
    assert _rel(fast.values.grad, ref.values.grad) < 1e-2
    exact = (dy.float().t() @ x.float()).gather(1, torch.arange(512, device="cuda") // 2 * 4 + fast.idx.long())
    assert _rel(fast.values.grad, exact) > 0.1  # the MVUE gradient ran (no plan fell back to the exact one)
