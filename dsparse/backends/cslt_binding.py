"""A ctypes binding to libcusparseLt: ``torch._cslt_sparse_mm`` on cached plans.

torch 2.11's ``_cslt_sparse_mm`` creates its descriptors and runs ``cusparseLtMatmulPlanInit``
on every call, ~0.6-1.2 ms of host time, as long as the kernel itself or longer. This module
calls the library torch loaded, with the descriptors torch 2.11 builds (so data from
``torch._cslt_compress`` reads identically), but keeps every plan for the life of the
process: one plan per (thread's handle, device, m, k, n, dtype, transpose_result,
alg_id, split-k, bias or not). Handles are per thread and device, as cuSPARSELt requires (autograd
runs backward on its own thread); workspaces come from torch's caching allocator; work
goes to ``torch.cuda.current_stream()``.

Before its first product per dtype and device the binding compares itself with
``torch._cslt_sparse_mm`` on a small problem. If the library cannot be loaded, its version
differs from torch's, the check fails, or ``DSPARSE_CSLT_BINDING=0`` is set,
:func:`unavailable_reason` says why (logged once) and callers use torch's op instead.

Sizes, enum values and signatures: ``include/cusparseLt.h`` of cuSPARSELt 0.8.0
(``nvidia-cusparselt-cu13``), ``cusparse.h`` and ``library_types.h``.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import site
import threading
from ctypes import POINTER, byref, c_char_p, c_int, c_int32, c_int64, c_size_t, c_uint32, c_void_p

import torch

log = logging.getLogger(__name__)

_OPAQUE = 512  # every cusparseLt*_t is `struct { alignas(16) uint8_t data[512]; }`
_ALIGN = 16
_CUDA_R_16F, _CUDA_R_16BF = 2, 14  # cudaDataType
_VALUE_TYPES = {torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}
_ORDER_COL, _ORDER_ROW = 1, 2  # cusparseOrder_t
_OP_N, _OP_T = 0, 1  # cusparseOperation_t
_SPARSITY_50_PERCENT = 0  # cusparseLtSparsity_t
_COMPUTE_32F = 2  # cusparseComputeType
_ALG_DEFAULT = 0  # cusparseLtMatmulAlg_t
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID, _SPLIT_K, _SPLIT_K_MODE = 0, 1, 3, 4  # cusparseLtMatmulAlgAttribute_t
_BIAS_POINTER = 8  # cusparseLtMatmulDescAttribute_t
_MAJOR, _MINOR, _PATCH = 0, 1, 2  # libraryPropertyType

_P = c_void_p
_SIGNATURES: dict[str, list] = {
    "cusparseLtInit": [_P],
    "cusparseLtGetProperty": [c_int, POINTER(c_int)],
    "cusparseLtStructuredDescriptorInit": [_P, _P, c_int64, c_int64, c_int64, c_uint32, c_int, c_int, c_int],
    "cusparseLtDenseDescriptorInit": [_P, _P, c_int64, c_int64, c_int64, c_uint32, c_int, c_int],
    "cusparseLtMatDescriptorDestroy": [_P],
    "cusparseLtMatmulDescriptorInit": [_P, _P, c_int, c_int, _P, _P, _P, _P, c_int],
    "cusparseLtMatmulDescSetAttribute": [_P, _P, c_int, _P, c_size_t],
    "cusparseLtMatmulAlgSelectionInit": [_P, _P, _P, c_int],
    "cusparseLtMatmulAlgSetAttribute": [_P, _P, c_int, _P, c_size_t],
    "cusparseLtMatmulAlgGetAttribute": [_P, _P, c_int, _P, c_size_t],
    "cusparseLtMatmulAlgSelectionDestroy": [_P],
    "cusparseLtMatmulPlanInit": [_P, _P, _P, _P],
    "cusparseLtMatmulGetWorkspace": [_P, _P, POINTER(c_size_t)],
    "cusparseLtMatmulPlanDestroy": [_P],
    # handle, plan, alpha, d_A, d_B, beta, d_C, d_D, workspace, streams, numStreams
    "cusparseLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, c_int32],
}

_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_LOCK = threading.Lock()
_reasons: dict[tuple[torch.dtype, int], str | None] = {}  # (dtype, device) -> why unavailable, None if usable
_logged: set[str] = set()
_TLS = threading.local()
_ALL_STATES: list[_DeviceState] = []  # keeps every thread's handle and plans alive until exit
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)  # alpha and beta (host, fp32 compute)
_ALPHA, _BETA = ctypes.addressof(_ONE), ctypes.addressof(_ZERO)


def _aligned(count: int) -> tuple[ctypes.Array, int]:
    """A buffer for ``count`` opaque cuSPARSELt structs and the 16-byte aligned address of the first."""
    buf = (ctypes.c_uint8 * (count * _OPAQUE + _ALIGN))()
    return buf, -(-ctypes.addressof(buf) // _ALIGN) * _ALIGN


def _call(name: str, *args) -> None:
    status = getattr(_lib, name)(*args)
    if status:
        raise RuntimeError(f"cuSPARSELt {name} failed: {_lib.cusparseLtGetErrorString(status).decode()} ({status})")


def _library_path() -> str | None:
    """The libcusparseLt this process already loaded for torch, else one in site-packages."""
    torch.backends.cusparselt.version()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libcusparseLt.so"):
                    return fields[5].strip()
    except OSError:
        pass
    for root in [*site.getsitepackages(), site.getusersitepackages()]:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "cusparselt", "lib", "libcusparseLt.so*")))
        if hits:
            return hits[0]
    return None


def _load() -> str | None:
    """Load the library once; the reason it cannot be used, or None."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _load_error
    if os.environ.get("DSPARSE_CSLT_BINDING", "1") == "0":
        _load_error = "disabled by DSPARSE_CSLT_BINDING=0"
        return _load_error
    path = _library_path()
    if path is None:
        _load_error = "libcusparseLt was found neither among this process's libraries nor in site-packages"
        return _load_error
    try:
        lib = ctypes.CDLL(path)
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, c_int
        lib.cusparseLtGetErrorString.argtypes, lib.cusparseLtGetErrorString.restype = [c_int], c_char_p
        major, minor, patch = (c_int(), c_int(), c_int())
        for prop, out in ((_MAJOR, major), (_MINOR, minor), (_PATCH, patch)):
            if lib.cusparseLtGetProperty(prop, byref(out)):
                raise OSError("cusparseLtGetProperty failed")
    except (OSError, AttributeError) as e:
        _load_error = f"cannot use {path}: {e}"
        return _load_error
    version = major.value * 1000 + minor.value * 100 + patch.value
    if version != torch.backends.cusparselt.version():
        _load_error = f"{path} is cuSPARSELt {version}, torch was built with {torch.backends.cusparselt.version()}"
        return _load_error
    _lib = lib
    return None


def _describe(handle: int, base: int, m: int, k: int, n: int, dtype: torch.dtype, transpose_result: bool,
              bias_ptr: int, made: list[tuple[str, int]], x_kn: bool = False) -> int:
    """Initialise at ``base`` the descriptors torch 2.11 makes for ``compressed_A (m, k)`` and
    ``dense_B = X.t()`` with ``X (n, k)`` contiguous (``x_kn``: ``dense_B = X``, ``(k, n)`` contiguous),
    a matmul descriptor and an algorithm selection (what needs destroying goes to ``made``);
    returns how many algorithm ids cuSPARSELt offers."""
    sparse, dense, out, matmul, alg_sel = (base + i * _OPAQUE for i in range(5))
    vtype = _VALUE_TYPES[dtype]
    _call("cusparseLtStructuredDescriptorInit", handle, sparse, m, k, k, 16, vtype, _ORDER_ROW, _SPARSITY_50_PERCENT)
    made.append(("cusparseLtMatDescriptorDestroy", sparse))
    _call("cusparseLtDenseDescriptorInit", handle, dense, *((k, n, n) if x_kn else (n, k, k)), 16, vtype, _ORDER_ROW)
    made.append(("cusparseLtMatDescriptorDestroy", dense))
    _call("cusparseLtDenseDescriptorInit", handle, out, m, n, m if transpose_result else n, 16, vtype,
          _ORDER_COL if transpose_result else _ORDER_ROW)
    made.append(("cusparseLtMatDescriptorDestroy", out))
    _call("cusparseLtMatmulDescriptorInit", handle, matmul, _OP_N, _OP_N if x_kn else _OP_T, sparse, dense, out, out,
          _COMPUTE_32F)
    if bias_ptr:
        cell = c_void_p(bias_ptr)
        _call("cusparseLtMatmulDescSetAttribute", handle, matmul, _BIAS_POINTER, ctypes.addressof(cell), 8)
    _call("cusparseLtMatmulAlgSelectionInit", handle, alg_sel, matmul, _ALG_DEFAULT)
    made.append(("cusparseLtMatmulAlgSelectionDestroy", alg_sel))
    count = c_int()
    _call("cusparseLtMatmulAlgGetAttribute", handle, alg_sel, _ALG_CONFIG_MAX_ID, ctypes.addressof(count), 4)
    return count.value


def _destroy(made: list[tuple[str, int]]) -> None:
    for name, ptr in reversed(made):
        getattr(_lib, name)(ptr)


class _Plan:
    """Descriptors, algorithm selection and plan of one product; kept (never destroyed) once made."""

    __slots__ = ("_buffer", "matmul", "plan", "workspace")

    def __init__(self, handle: int, m: int, k: int, n: int, dtype: torch.dtype, transpose_result: bool,
                 alg_id: int, bias_ptr: int, x_kn: bool, split_k: int = 1, split_k_mode: int = 0):
        self._buffer, base = _aligned(6)
        self.matmul, alg_sel, self.plan = (base + i * _OPAQUE for i in (3, 4, 5))
        made: list[tuple[str, int]] = []  # destroyed again if a step fails
        try:
            _describe(handle, base, m, k, n, dtype, transpose_result, bias_ptr, made, x_kn)
            alg = c_int(alg_id)  # as torch: not checked against alg_count (see there)
            _call("cusparseLtMatmulAlgSetAttribute", handle, alg_sel, _ALG_CONFIG_ID, ctypes.addressof(alg), 4)
            if split_k > 1:  # as torch sets them: the factor, then the mode where one is named
                for attribute, value in ((_SPLIT_K, split_k), (_SPLIT_K_MODE, split_k_mode)):
                    if value:
                        cell = c_int(value)
                        _call("cusparseLtMatmulAlgSetAttribute", handle, alg_sel, attribute, ctypes.addressof(cell), 4)
            _call("cusparseLtMatmulPlanInit", handle, self.plan, self.matmul, alg_sel)
            made.append(("cusparseLtMatmulPlanDestroy", self.plan))
            size = c_size_t()
            _call("cusparseLtMatmulGetWorkspace", handle, self.plan, byref(size))
        except RuntimeError:
            _destroy(made)
            raise
        self.workspace = size.value


class _DeviceState:
    """One thread's cuSPARSELt handle on one device, its plans, and argument cells for calls."""

    def __init__(self, device: int):
        self._buffer, self.handle = _aligned(1)
        self.stream, self.bias = c_void_p(), c_void_p()
        self.stream_ptr, self.bias_ptr = ctypes.addressof(self.stream), ctypes.addressof(self.bias)
        self.plans: dict[tuple, _Plan] = {}
        with torch.cuda.device(device):
            _call("cusparseLtInit", self.handle)


def _state(device: int) -> _DeviceState:
    states = getattr(_TLS, "states", None)
    if states is None:
        states = _TLS.states = {}
    state = states.get(device)
    if state is None:
        state = states[device] = _DeviceState(device)
        _ALL_STATES.append(state)
    return state


def sparse_mm(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None, transpose_result: bool,
              alg_id: int, *, x_kn: bool = False, split_k: int = 1, split_k_mode: int = 0) -> torch.Tensor:
    """``torch._cslt_sparse_mm(packed, x2d.t(), bias=bias, transpose_result=..., alg_id=...)`` on a cached plan.

    ``packed``: ``torch._cslt_compress`` of an ``(m, k)`` matrix, 2:4 along ``k``; ``x2d``: contiguous
    ``(n, k)`` of the same dtype (fp16/bf16), ``n`` a multiple of 8; ``bias``: ``(m,)`` of that dtype.
    Returns ``A @ x2dᵀ (+ bias[:, None])`` as a row-major ``(m, n)``, or its transpose ``(n, m)``
    with ``transpose_result``. ``x_kn``: ``x2d`` is the contiguous ``(k, n)`` right operand itself
    (``A @ x2d``; e.g. activations ``(tokens, in)`` for a product along the tokens), no transposed copy.
    ``split_k`` > 1 splits the reduction (``split_k_mode``: ``cusparseLtSplitKMode_t``, 0 leaves it to
    cuSPARSELt). Check :func:`unavailable_reason` first.
    """
    k, n = x2d.shape if x_kn else x2d.shape[::-1]
    m = packed.shape[0]
    dtype, device = x2d.dtype, x2d.device
    if not (x2d.is_contiguous() and packed.is_contiguous() and packed.dtype == dtype and packed.device == device
            and (bias is None or (bias.shape == (m,) and bias.dtype == dtype and bias.is_contiguous()))):
        raise ValueError("sparse_mm needs a contiguous x2d, and packed and bias (m,) of its dtype and device")
    index = device.index
    if torch.cuda.current_device() != index:
        with torch.cuda.device(index):
            return sparse_mm(packed, x2d, bias, transpose_result, alg_id, x_kn=x_kn, split_k=split_k,
                             split_k_mode=split_k_mode)
    state = _state(index)
    key = (m, k, n, dtype, transpose_result, alg_id, bias is not None, x_kn, split_k, split_k_mode)
    plan = state.plans.get(key)
    if plan is None:
        plan = state.plans[key] = _Plan(state.handle, m, k, n, dtype, transpose_result, alg_id,
                                        0 if bias is None else bias.data_ptr(), x_kn, split_k, split_k_mode)
    out = torch.empty((n, m) if transpose_result else (m, n), dtype=dtype, device=device)
    if bias is not None:  # the plan reads the bias pointer from its matmul descriptor at each call
        state.bias.value = bias.data_ptr()
        _call("cusparseLtMatmulDescSetAttribute", state.handle, plan.matmul, _BIAS_POINTER, state.bias_ptr, 8)
    workspace = torch.empty(plan.workspace, dtype=torch.uint8, device=device) if plan.workspace else None
    state.stream.value = torch._C._cuda_getCurrentRawStream(index)
    _call("cusparseLtMatmul", state.handle, plan.plan, _ALPHA, packed.data_ptr(), x2d.data_ptr(), _BETA,
          out.data_ptr(), out.data_ptr(), None if workspace is None else workspace.data_ptr(), state.stream_ptr, 1)
    return out


def alg_count(m: int, k: int, n: int, dtype: torch.dtype, transpose_result: bool) -> int:
    """How many algorithm ids (0 .. count - 1) cuSPARSELt offers for :func:`sparse_mm` of this shape
    on the current device (``CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID``).

    Not every id below the count works: on an H100 (cuSPARSELt 0.8.0) fp16 with a transposed
    result reports 52 against 27 untransposed (bf16: 21 and 21); ids up to 27 ran correctly there,
    but 51 broke the CUDA context and trying the ids from 28 up crashed a tuning run (illegal
    instruction). Like torch, :func:`sparse_mm` runs any id cuSPARSELt accepts.
    """
    device = torch.cuda.current_device()
    reason = unavailable_reason(dtype, torch.device("cuda", device))
    if reason is not None:
        raise RuntimeError(f"cuSPARSELt binding unavailable: {reason}")
    state = _state(device)
    _buffer, base = _aligned(5)
    made: list[tuple[str, int]] = []
    try:
        return _describe(state.handle, base, m, k, n, dtype, transpose_result, 0, made)
    finally:
        _destroy(made)


def _self_check(dtype: torch.dtype, device: torch.device) -> str | None:
    """Compare with ``torch._cslt_sparse_mm`` on a small problem: both layouts, no bias and two biases."""
    m, k, n = 64, 128, 24
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(m, k // 4, 4, generator=gen, device=device)
    keep = torch.zeros_like(w).scatter_(-1, w.abs().topk(2, dim=-1).indices, 1.0)
    packed = torch._cslt_compress((w * keep).view(m, k).to(dtype))
    x = torch.randn(n, k, generator=gen, device=device).to(dtype)
    biases = [None, *(torch.randn(m, generator=gen, device=device).to(dtype) for _ in range(2))]
    for transpose in (False, True):
        for bias in biases:  # the second bias reuses the first one's plan: checks the pointer is rebound
            got = sparse_mm(packed, x, bias, transpose, 0).float()
            want = torch._cslt_sparse_mm(packed, x.t(), bias=bias, transpose_result=transpose).float()
            if got.shape != want.shape or (got - want).norm() > 1e-3 * want.norm():
                return (f"differs from torch._cslt_sparse_mm ({dtype}, transpose_result={transpose}, "
                        f"bias={bias is not None})")
    got = sparse_mm(packed, x.t().contiguous(), None, False, 0, x_kn=True).float()
    want = torch._cslt_sparse_mm(packed, x.t()).float()
    if (got - want).norm() > 1e-3 * want.norm():
        return f"differs from torch._cslt_sparse_mm ({dtype}, right operand (k, n) row-major)"
    return None


def unavailable_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the binding cannot run ``dtype`` products on ``device`` (None: it can). Checked once per pair."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (dtype, index)
    if key in _reasons:
        return _reasons[key]
    if torch.cuda.is_current_stream_capturing():
        return "not checked yet (first use inside CUDA graph capture)"
    with _LOCK:
        if key not in _reasons:
            reason = _load()
            if reason is None and dtype not in _VALUE_TYPES:
                reason = f"{dtype} is not fp16 or bf16"
            if reason is None:
                try:
                    with torch.cuda.device(index):
                        reason = _self_check(dtype, torch.device("cuda", index))
                except RuntimeError as e:
                    reason = f"self-check failed: {e}"
            _reasons[key] = reason
            if reason is not None and reason not in _logged:
                _logged.add(reason)
                log.warning("dsparse: cuSPARSELt binding unused (torch._cslt_sparse_mm instead): %s", reason)
    return _reasons[key]


def available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`sparse_mm` runs ``dtype`` products on ``device``."""
    return unavailable_reason(dtype, device) is None
