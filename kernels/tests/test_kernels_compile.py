"""Every kernel compiles for sm_80 and sm_90 (TTIR -> PTX -> cubin with triton's bundled ptxas), no GPU needed.

The CPU tests run the kernels through the interpreter, which accepts code the compiler
rejects (e.g. non-constexpr globals); this catches that on CPU-only machines. Launches
are captured, not run, so the arguments are specialized exactly as on the GPU.
"""
import pytest
import torch

from kernels import (bias_add, gather_kept, lowrank_addmm, lowrank_silu_mul, mvue_compress, mvue_compress_swiglu,
                     mvue_transpose, rms_norm_backward,
                     rms_norm_forward,
                     rope_backward, rope_forward, silu_mul_backward, silu_mul_forward, skinny_sparse_mm,
                     transpose_keep_and_slots, transpose_values)
from kernels import weight_grad_kept
from kernels._testing import random_keep_t, random_kept
from kernels.kept_grad import TILES as KEPT_GRAD_TILES
from kernels._triton import capture_launches, compile_offline

nvidia = pytest.importorskip("triton.backends.nvidia.compiler")


def _compile(fn, arch, **override):
    with capture_launches() as calls:
        fn()
    assert len(calls) == 1
    kernel, _grid, args, kwargs = calls[0]
    compiled = compile_offline(kernel, args, {**kwargs, **override}, arch)
    assert compiled.asm.get("cubin"), "no cubin"
    return compiled


def _weight(dtype):
    values, idx = random_kept(64, 128, dtype, "cpu", "randn")
    keep_t = torch.zeros_like(idx, dtype=torch.bool)
    return values, idx, keep_t


@pytest.mark.parametrize("arch", [80, 90])
def test_transpose_values_compiles(arch):
    values, idx, keep_t = _weight(torch.bfloat16)
    _compile(lambda: transpose_values(values, idx, keep_t), arch)
    _compile(lambda: transpose_values(values, idx, keep_t, values_out=torch.empty_like(values)), arch)


@pytest.mark.parametrize("arch", [80, 90])
def test_transpose_keep_and_slots_compiles(arch):
    values, idx, _ = _weight(torch.bfloat16)
    _compile(lambda: transpose_keep_and_slots(values, idx), arch)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lowrank_addmm_compiles(arch, dtype):
    y = torch.zeros(64, 96, dtype=dtype)
    u = torch.zeros(64, 24, dtype=dtype)
    b = torch.zeros(96, 24, dtype=dtype)
    bias = torch.zeros(96, dtype=dtype)
    # on CPU the wrapper picks the fp32 product for bf16 (an interpreter limitation): ask for the GPU's
    override = {"IEEE": False} if dtype == torch.bfloat16 else {}
    _compile(lambda: lowrank_addmm(y, u, b, 0.5, bias), arch, **override)
    _compile(lambda: lowrank_silu_mul(y, u, b, 0.5), arch, **override)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gather_kept_compiles(arch, dtype):
    _, idx = random_kept(64, 128, torch.bfloat16, "cpu", "randn")
    _compile(lambda: gather_kept(torch.zeros(64, 128, dtype=dtype), idx, 2, 4), arch)
    # N and M not powers of two: the 3-D loads
    _compile(lambda: gather_kept(torch.zeros(64, 120, dtype=dtype), torch.zeros(64, 60, dtype=torch.uint8), 3, 6), arch)


_TMA_TILE = next(name for name, c in KEPT_GRAD_TILES.items() if c.get("TMA"))
_POINTER_TILE = next(iter(KEPT_GRAD_TILES))


@pytest.mark.parametrize("arch, dtype, tiles, tokens", [(90, torch.bfloat16, list(KEPT_GRAD_TILES), 512),
                                                        (90, torch.bfloat16, [_POINTER_TILE, _TMA_TILE], 500),  # a tail
                                                        (90, torch.float16, [_POINTER_TILE, _TMA_TILE], 512),
                                                        (80, torch.bfloat16, [_POINTER_TILE], 512),
                                                        (90, torch.float32, ["128x64x64_w4_s4"], 512)])
def test_weight_grad_kept_compiles_to_tensor_core_code_without_spills(arch, dtype, tiles, tokens):
    """Every tile a plan may choose builds; on Hopper, in fp16/bf16, its products are wgmma (asynchronous
    warpgroup MMA), TMA tiles load through the tensor memory accelerator, and, at most 255 registers a
    thread (a 128x256 fp32 accumulator takes 128 of them on 8 warps), nothing spills to local memory
    where the tiles divide the gradient (any token count)."""
    _, idx = random_kept(256, 512, torch.bfloat16, "cpu", "randn")
    dy, x = torch.zeros(tokens, 256, dtype=dtype), torch.zeros(tokens, 512, dtype=dtype)
    # on CPU the wrapper runs the interpreter's way (fp32 products, a constexpr trip count): ask for the GPU's
    gpu = {"IEEE": dtype == torch.float32, "STEPS": 0}
    for tile in tiles:
        compiled = _compile(lambda: weight_grad_kept(dy, x, idx, 2, 4, config=KEPT_GRAD_TILES[tile]), arch, **gpu)
        if arch == 90 and dtype != torch.float32:
            ptx = compiled.asm["ptx"]
            assert "wgmma.mma_async" in ptx, tile
            # TMA tiles copy whole tiles with the tensor memory accelerator (the interpreter's launch, captured
            # here, took them: the tensors allow it)
            assert ("cp.async.bulk.tensor" in ptx) == bool(KEPT_GRAD_TILES[tile].get("TMA")), tile
            assert " 0 bytes spill stores" in _ptxas_report(ptx, arch), tile


def _ptxas_report(ptx: str, arch: int) -> str:
    """What triton's bundled ptxas says (``-v``) building ``ptx`` for ``sm_<arch>``: registers and spills."""
    import subprocess
    import tempfile

    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/k.ptx", "w") as f:
            f.write(ptx)
        done = subprocess.run([nvidia.get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", f"{tmp}/k.ptx", "-o",
                               f"{tmp}/k.cubin"], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mvue_kernels_compile(arch, dtype):
    gpu = {"ROUND_BF16": False}  # on CPU the wrapper rounds bf16 by hand (the interpreter truncates): ask for the GPU's
    _compile(lambda: mvue_transpose(torch.zeros(40, 64, dtype=dtype), 12345, 48), arch, **gpu)
    _compile(lambda: mvue_compress(torch.zeros(40, 64, dtype=dtype), 12345, 64), arch, **gpu)
    _compile(lambda: mvue_compress(torch.zeros(40, 64, dtype=dtype), 12345, 64, config={"INT64": True}), arch, **gpu)
    gate_up, dh = torch.zeros(40, 128, dtype=dtype), torch.zeros(40, 64, dtype=dtype)
    _compile(lambda: mvue_compress_swiglu(dh, gate_up, 12345, 64), arch, **gpu)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_compiles(arch, dtype):
    x, w = torch.zeros(40, 2048, dtype=dtype), torch.ones(2048, dtype=dtype)
    _compile(lambda: rms_norm_forward(x, w, 1e-6), arch)
    wide = torch.zeros(40, 2048 + 80, dtype=dtype)  # into a folded adapter's wide input
    _compile(lambda: rms_norm_forward(x, w, 1e-6, out=wide[:, :2048]), arch)
    _compile(lambda: rms_norm_backward(x, x, w, torch.ones(40)), arch)


@pytest.mark.parametrize("arch", [80, 90])
def test_silu_mul_compiles(arch):
    g = torch.zeros(40, 5632, dtype=torch.bfloat16)
    _compile(lambda: silu_mul_forward(g, g), arch)
    _compile(lambda: silu_mul_backward(g, g, g), arch)
    gu = torch.zeros(40, 2 * 5632, dtype=torch.bfloat16)  # a fused gate/up output's halves, in place
    halves = (gu[:, :5632], gu[:, 5632:])
    _compile(lambda: silu_mul_forward(*halves), arch)
    wide = torch.zeros(40, 5632 + 64, dtype=torch.bfloat16)  # into a folded adapter's wide input
    _compile(lambda: silu_mul_forward(*halves, out=wide[:, :5632]), arch)
    _compile(lambda: silu_mul_backward(g, *halves, out=halves), arch)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_compiles(arch, dtype):
    q = torch.zeros(2, 16, 32, 4, 64, dtype=dtype)[:, :, :, 0].transpose(1, 2)  # (b, h, s, d), strided
    cos = torch.zeros(1, 16, 64, dtype=dtype)
    _compile(lambda: rope_forward(q, cos, cos), arch)
    _compile(lambda: rope_backward(q, cos, cos), arch)


def test_bias_add_compiles():
    y = torch.zeros(64, 96, dtype=torch.float16)
    _compile(lambda: bias_add(y, torch.zeros(96, dtype=torch.float16)), 90)


def test_small_test_configs_compile():
    """The tiny tile configs the correctness tests use on CUDA (1 warp, partial tiles) compile too."""
    values, idx = random_kept(48, 80, torch.float64, "cpu", "randn")
    keep_t = random_keep_t(48, 80)
    _compile(lambda: transpose_values(values, idx, keep_t,
                                      config={"BLOCK_H": 4, "BLOCK_G": 8, "num_warps": 1}), 90)
    values, idx = random_kept(48, 80, torch.float16, "cpu", "ties")
    _compile(lambda: transpose_keep_and_slots(values, idx, config={"BLOCK_H": 2, "BLOCK_G": 8, "num_warps": 1}), 90)
    y = torch.zeros(50, 72, dtype=torch.bfloat16)
    u = torch.zeros(50, 70, dtype=torch.bfloat16)
    b = torch.zeros(72, 70, dtype=torch.bfloat16)
    _compile(lambda: lowrank_addmm(y, u, b, 0.5, config={"BLOCK_T": 16, "BLOCK_N": 32, "num_warps": 1}), 90,
             IEEE=False)


def test_launch_specialization_keys_what_triton_compiles_for():
    from kernels._triton import _launch_key

    def _specialization(arg):
        return _launch_key(0, (arg,), {})[1]

    t = torch.zeros(8)
    assert _specialization(t) == (torch.float32, True) and _specialization(t[1:]) == (torch.float32, False)
    assert _specialization(1) != _specialization(17) and _specialization(16) == _specialization(32)
    assert _specialization(17) == _specialization(3) and _specialization(2**31) != _specialization(16)
    assert _specialization(True) != _specialization(1) and _specialization(0.5) == _specialization(2.0)
    assert _specialization(None) != _specialization(False) and _specialization(-(2**31))[0] == 32 == _specialization(3)[0]
    assert _launch_key(0, (t, 1), {"BLOCK": 64}) != _launch_key(0, (t, 1), {"BLOCK": 128})
    assert _launch_key(0, (t,), {}) != _launch_key(1, (t,), {})  # the device


def test_empty_launch_hooks_are_skipped_and_set_ones_kept():
    from triton.knobs import HookChain

    from kernels._triton import _hook

    chain = HookChain()
    assert _hook(None) is None and _hook(chain) is None
    chain.add(print)
    assert _hook(chain) is chain and _hook(print) is print  # a plain callable (older Triton) is a hook


def test_host_grid_helpers_match_triton():
    """kernels._triton.cdiv / next_power_of_2 compute what triton's constexpr functions do, at a plain call's cost."""
    import triton

    from kernels._triton import cdiv, next_power_of_2

    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 4096):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_sparse_mm_compiles(arch, dtype):
    packed = torch.zeros(128, 256 // 2 + 256 // 16, dtype=dtype)
    x, bias = torch.zeros(8, 256, dtype=dtype), torch.zeros(128, dtype=dtype)
    gpu = {"IEEE": False}  # on CPU the wrapper multiplies bf16 in fp32 (an interpreter limitation): ask for the GPU's
    _compile(lambda: skinny_sparse_mm(packed, x, bias), arch, **gpu)
    _compile(lambda: skinny_sparse_mm(packed, torch.zeros(40, 256, dtype=dtype)), arch, **gpu)
    split = _compile(lambda: skinny_sparse_mm(packed, x, bias, config={"SPLIT_K": 2}), arch, **gpu)
    ptx = split.asm["ptx"]  # the ticket after a CTA barrier (acquire-release at GPU scope), then its reset
    ticket = ptx.index("atom.global.gpu.acq_rel.add")
    assert ptx.rfind("bar.sync", 0, ticket) > ptx.rfind("st.global", 0, ticket) > 0  # partials stored, then barrier
    assert "atom.global.gpu.acq_rel.exch" in ptx[ticket:]
