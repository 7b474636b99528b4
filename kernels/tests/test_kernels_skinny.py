"""kernels.skinny_sparse_mm: few-token products on cuSPARSELt's compressed operand, against the reference."""
import pytest
import torch

from kernels import skinny_sparse_mm, skinny_sparse_mm_reference
from kernels._testing import compressed_operand as _operand


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols, tokens", [(64, 64, 1), (128, 320, 8), (192, 256, 16), (64, 128, 37)])
def test_matches_the_dense_product_in_fp32(rows, cols, tokens, dtype, device):
    packed, dense = _operand(rows, cols, dtype, device, seed=rows + tokens)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).to(device)
    bias = torch.randn(rows, generator=gen).to(dtype).to(device)
    if device == "cuda":  # what cuSPARSELt itself writes
        assert torch.equal(packed.reshape(-1).view(torch.uint8), torch._cslt_compress(dense).reshape(-1).view(torch.uint8))
    for b in (None, bias):
        got = skinny_sparse_mm(packed, x, b)
        want = x.float() @ dense.float().t() + (0 if b is None else b.float())
        assert got.shape == (tokens, rows) and got.dtype == dtype
        # one rounding of an fp32 sum (the interpreter truncates bf16: 2 ulps)
        torch.testing.assert_close(got.float(), want, rtol=2 ** -6, atol=1e-2)
        torch.testing.assert_close(got, skinny_sparse_mm_reference(packed, x, b), rtol=2 ** -6, atol=1e-2)


def test_reads_rows_at_their_stride_and_any_token_count(device):
    packed, dense = _operand(128, 192, torch.float16, device, mode="ties")
    wide = torch.randn(150, 256).half().to(device)
    x = wide[:, :192]  # rows 256 apart; more tokens than one tile
    got = skinny_sparse_mm(packed, x, config={"BLOCK_R": 32, "BLOCK_K": 64})
    torch.testing.assert_close(got.float(), x.float() @ dense.float().t(), rtol=2 ** -9, atol=1e-2)


@pytest.mark.parametrize("splits, tokens", [(2, 5), (3, 70), (8, 16)])
def test_split_k_adds_the_partials_in_split_order_and_leaves_the_counters_at_zero(splits, tokens, device):
    from kernels import skinny

    packed, dense = _operand(128, 320, torch.bfloat16, device, seed=splits)  # 5 chunks of 64: uneven splits
    gen = torch.Generator().manual_seed(splits)
    x = torch.randn(tokens, 320, generator=gen).bfloat16().to(device)
    bias = torch.randn(128, generator=gen).bfloat16().to(device)
    one = skinny_sparse_mm(packed, x, bias, config={"BLOCK_K": 64, "SPLIT_K": 1})
    for _ in range(2):  # the second launch reuses the counters the first reset
        got = skinny_sparse_mm(packed, x, bias, config={"BLOCK_K": 64, "SPLIT_K": splits})
        torch.testing.assert_close(got, one, rtol=2 ** -6, atol=1e-2)
        torch.testing.assert_close(got, skinny_sparse_mm_reference(packed, x, bias), rtol=2 ** -6, atol=1e-2)
    tickets = [t for (dev, _), t in skinny._TICKETS.items() if dev == x.device]
    assert tickets and all(int(t.abs().sum()) == 0 for t in tickets)
    if device == "cuda":  # the same sums in the same order: the same bits, launch after launch
        assert torch.equal(got, skinny_sparse_mm(packed, x, bias, config={"BLOCK_K": 64, "SPLIT_K": splits}))


def test_the_default_split_fills_the_sms_with_equal_splits():
    from kernels.skinny import PROGRAMS_PER_SM, split_k

    assert split_k(160, 16, torch.device("cpu")) == 1  # the interpreter runs programs one by one
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        assert split_k(PROGRAMS_PER_SM * sms, 16, dev) == 1
        s = split_k(16, 44, dev)
        assert 1 < s <= 44 and -(-44 // s) * (s - 1) < 44  # no split left without chunks


def test_a_group_of_zeros_reads_as_zeros_and_no_tokens_gives_an_empty_result(device):
    packed, _ = _operand(64, 64, torch.bfloat16, device, mode="zeros")
    x = torch.randn(3, 64).bfloat16().to(device)
    assert torch.equal(skinny_sparse_mm(packed, x), torch.zeros(3, 64, dtype=torch.bfloat16, device=device))
    assert skinny_sparse_mm(packed, x[:0]).shape == (0, 64)


def test_bad_operands_are_refused_with_the_fix():
    packed, _ = _operand(64, 128, torch.float16, "cpu")
    x = torch.randn(4, 128).half()
    with pytest.raises(ValueError, match="compressed form of a \\(64, 128\\) operand"):
        skinny_sparse_mm(packed[:, :-1], x)
    with pytest.raises(TypeError, match="fp32|float32"):
        skinny_sparse_mm(packed, x.float())
    with pytest.raises(ValueError, match="multiples of 64"):
        skinny_sparse_mm(packed[:32], x)
    with pytest.raises(ValueError, match="bias"):
        skinny_sparse_mm(packed, x, torch.zeros(32, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        skinny_sparse_mm(packed, x.t().contiguous().t())
    with pytest.raises(ValueError, match="multiple of 32"):
        skinny_sparse_mm(packed, x, config={"BLOCK_K": 48})
    with pytest.raises(ValueError, match="SPLIT_K >= 0"):
        skinny_sparse_mm(packed, x, config={"SPLIT_K": -1})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_k_replays_in_a_cuda_graph():
    """Captured (as GraphDecoder captures a decoding step), the split kernel's counters reset on every replay."""
    packed, _ = _operand(256, 1024, torch.bfloat16, "cuda", seed=5)
    x = torch.randn(8, 1024, device="cuda").bfloat16()
    cfg = {"SPLIT_K": 4}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        skinny_sparse_mm(packed, x, config=cfg)  # warm-up off the default stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_sparse_mm(packed, x, config=cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(y, skinny_sparse_mm(packed, x, config=cfg))
