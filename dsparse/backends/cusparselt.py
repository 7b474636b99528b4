"""The cuSPARSELt backend: torch's ``_cslt_*`` ops on NVIDIA GPUs (sm_80 and newer).

Operands: ``W`` (``(out, in)``, 2:4 along ``in``) and the double-pruned ``W̃ᵀ``
(``(in, out)``, 2:4 along ``out``), each compressed by ``torch._cslt_compress``. Both
products put the sparse operand first, as cuSPARSELt requires:

* forward:        ``Yᵀ = W Xᵀ``     -> ``_cslt_sparse_mm(W_c, Xᵀ, bias)``
* input gradient: ``dXᵀ = W̃ᵀ dYᵀ`` -> ``_cslt_sparse_mm(W̃ᵀ_c, dYᵀ)``

``Xᵀ`` is a transposed view (no copy); whether cuSPARSELt writes the result transposed
and which algorithm it uses come from the per-shape plan (:mod:`.plans`).

Refresh without recompression: a compressed operand starts with its kept values,
row-major, followed by metadata. Compression therefore runs only when a mask changes,
on a matrix holding ones at exactly the 2 slots per group this backend chose (so
cuSPARSELt's metadata names our slots even where a kept value is zero); after each
optimizer step one Triton kernel (:func:`kernels.transpose_values`) rewrites both
operands' values regions in place, deriving W̃ᵀ's slots on the fly (no slot table is
kept). The layout is verified once per process and dtype; if a cuSPARSELt version lays it
out otherwise, every refresh recompresses instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import nm
from .base import Backend, mvue_grad_output, padded_tokens, reduce_to_kept
from .plans import Plan, plan_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_MIN_DIM = 16  # cuSPARSELt: both dims of the sparse operand multiples of 16 for 16-bit types
_TOKEN_MULTIPLE = 8  # and the dense operand's free dim a multiple of 8
_layout_ok: dict[torch.dtype, bool] = {}
_meta_layout_ok: dict[torch.dtype, bool] = {}  # kernels.cslt_meta describes this cuSPARSELt's layout


@dataclass
class CompressedOperands:
    weight: torch.Tensor  # compressed W (out, in)
    weight_t: torch.Tensor | None  # compressed W̃ᵀ (in, out); dx="dense": the dense (out, in) M⊙W; "none": None
    dx: str  # how the input gradient runs: "sparse" (W̃ᵀ), "dense" ((M⊙W)ᵀ) or "none" (inference)
    out_features: int
    in_features: int
    # what the operands were built from (None once frozen for inference: then only sparse products run),
    # and the dense operands that products whose plan is a dense GEMM use (built on first use,
    # rebuilt at every refresh once they exist)
    source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # values, idx, keep_t
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # "fwd": M⊙W (out, in); "dx": W̃ᵀ (in, out)

    def dense_operand(self, role: str) -> torch.Tensor:
        """``A`` of ``x @ Aᵀ`` for ``role`` as a dense matrix (for dense plans)."""
        if role not in self.dense:
            values, idx, keep_t = self.source
            self.dense[role] = (nm.dense_from_kept(values, idx, 2, 4) if role == "fwd"
                                else nm.dense_transpose_from_kept(values, idx, keep_t, 2, 4)).contiguous()
        return self.dense[role]

    def rebind(self, values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor) -> None:
        """New values (same masks): rebuild the dense operands in use."""
        self.source = (values, idx, keep_t)
        for role in list(self.dense):
            del self.dense[role]
            self.dense_operand(role)


def cusparselt_available() -> bool:
    """True when torch was built with cuSPARSELt and a CUDA GPU of compute capability >= 8.0 is visible."""
    if not torch.cuda.is_available():
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def _values_region(packed: torch.Tensor, rows: int, kept: int) -> torch.Tensor:
    return packed.view(-1)[: rows * kept].view(rows, kept)


def _compress_slots(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Compress a (rows, cols) 2:4 operand whose metadata marks ``slots``, holding ``values``."""
    if not _inplace_layout_ok(values.dtype, values.device):
        return torch._cslt_compress(nm.scatter_kept(values, slots, 2, 4))
    packed = torch._cslt_compress(nm.scatter_kept(torch.ones_like(values), slots, 2, 4))
    _values_region(packed, *values.shape).copy_(values)
    return packed


def _inplace_layout_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether compressed operands start with their kept values, row-major (checked once per dtype)."""
    if dtype not in _layout_ok:
        gen = torch.Generator(device=device).manual_seed(0)
        dense = torch.randn(64, 128, generator=gen, device=device).to(dtype)
        idx = nm.kept_positions(nm.nm_mask(dense.abs().float(), 2, 4), 2, 4)
        kept = nm.gather_kept(dense, idx, 4)
        packed = torch._cslt_compress(nm.scatter_kept(kept, idx, 2, 4))
        _layout_ok[dtype] = bool(torch.equal(_values_region(packed, 64, 64), kept))
    return _layout_ok[dtype]


def _direct_compress_ok(dy2d: torch.Tensor, padded: int) -> bool:
    """Whether ``S(dYᵀ)`` ``(out, padded)`` can be written compressed by :func:`kernels.mvue_compress`:
    unpadded dims, and :mod:`kernels.cslt_meta`'s layout is what this cuSPARSELt writes."""
    return _meta_layout_described(dy2d.shape[1], padded, dy2d.dtype, dy2d.device)


def skinny_applies(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`kernels.skinny_sparse_mm` reads this backend's compressed ``(rows, cols)`` operands."""
    return _meta_layout_described(rows, cols, dtype, device)


def _meta_layout_described(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a ``(rows, cols)`` operand compresses unpadded and :mod:`kernels.cslt_meta`'s layout is what
    this cuSPARSELt writes (checked once per dtype)."""
    from kernels import cslt_meta

    if rows % cslt_meta.ALIGN or cols % cslt_meta.ALIGN or dtype not in SUPPORTED_DTYPES:
        return False
    if dtype not in _meta_layout_ok:
        gen = torch.Generator(device=device).manual_seed(0)
        dense = torch.randn(128, 192, generator=gen, device=device).to(dtype)
        idx = nm.kept_positions(nm.nm_mask(dense.abs().float(), 2, 4), 2, 4)
        kept = nm.gather_kept(dense, idx, 4)
        want = torch._cslt_compress(nm.scatter_kept(kept, idx, 2, 4))
        got = cslt_meta.compress_reference(kept, idx)
        _meta_layout_ok[dtype] = got.shape == want.shape and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    return _meta_layout_ok[dtype]


def transpose_slots(idx: torch.Tensor, keep_t: torch.Tensor) -> torch.Tensor:
    """W̃ᵀ's 2 slots per group of 4 along ``out``: its kept entries, then (lowest position first) fillers.

    Scores: 2 survives double pruning, 1 kept by W only, 0 pruned (torch; the reference).
    """
    score = keep_t.to(torch.uint8) + 1
    dense = nm.scatter_kept(score, idx, 2, 4).t().contiguous()  # (in, out)
    return nm.kept_positions(nm.nm_mask(dense, 2, 4), 2, 4)


def _transpose_values(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor,
                      slots_t: torch.Tensor) -> torch.Tensor:
    """W̃ᵀ's compressed values ``(in, out/2)`` at its slots (torch; the reference)."""
    dense_t = nm.dense_transpose_from_kept(values, idx, keep_t, 2, 4).contiguous()
    return nm.gather_kept(dense_t, slots_t, 4)


def _slots(idx: torch.Tensor, keep_t: torch.Tensor) -> torch.Tensor:
    """:func:`transpose_slots` in one Triton pass on CUDA: ranking ``keep_t`` as magnitudes 1 and 0,
    :func:`kernels.transpose_keep_and_slots` picks exactly these slots."""
    if not keep_t.is_cuda:
        return transpose_slots(idx, keep_t)
    from kernels import transpose_keep_and_slots

    return transpose_keep_and_slots(keep_t.to(torch.float16), idx)[1]


def _t_values(values: torch.Tensor, idx: torch.Tensor, keep_t: torch.Tensor, slots_t: torch.Tensor) -> torch.Tensor:
    """:func:`_transpose_values` in one Triton pass on CUDA (which derives ``slots_t`` itself)."""
    if not values.is_cuda:
        return _transpose_values(values, idx, keep_t, slots_t)
    from kernels import transpose_values

    return transpose_values(values, idx, keep_t)


class CusparseltBackend(Backend):
    name = "cusparselt"

    def unsupported_reason(self, device, dtype, n, m, out_features, in_features):
        if device.type != "cuda":
            return f"cuSPARSELt runs on CUDA GPUs only, and this layer is on {device}"
        if not cusparselt_available():
            return "this torch build or GPU has no cuSPARSELt (needs torch with cuSPARSELt and compute capability >= 8.0)"
        if dtype not in SUPPORTED_DTYPES:
            return f"cuSPARSELt runs 2:4 in fp16 and bf16, not {dtype}; train in fp16/bf16 or use backend 'reference'"
        if (n, m) != (2, 4):
            return f"this backend runs the 2:4 pattern, not {n}:{m}"
        for size, what in ((out_features, "out_features"), (in_features, "in_features")):
            if size % _MIN_DIM:
                return f"{what} = {size} is not a multiple of {_MIN_DIM}, which cuSPARSELt requires"
        return None

    def prepare(self, values, idx, keep_t, n, m, *, dx="sparse") -> CompressedOperands:
        weight = _compress_slots(values, idx)
        if dx != "sparse":
            weight_dx = nm.dense_from_kept(values, idx, n, m) if dx == "dense" else None
            return CompressedOperands(weight, weight_dx, dx, values.shape[0], idx.shape[1] * 2,
                                      source=(values, idx, keep_t))
        slots_t = _slots(idx, keep_t)  # only to compress: refreshes derive the slots again in the kernel
        weight_t = _compress_slots(_t_values(values, idx, keep_t, slots_t), slots_t)
        return CompressedOperands(weight, weight_t, dx, values.shape[0], idx.shape[1] * 2,
                                  source=(values, idx, keep_t))

    def refresh(self, ops: CompressedOperands, values, idx, keep_t, n, m, *, dx="sparse") -> CompressedOperands:
        if not _inplace_layout_ok(values.dtype, values.device):
            return self.prepare(values, idx, keep_t, n, m, dx=dx)
        if dx != "sparse":  # W in place; the dense dX operand (if any) rebuilt from the values
            _values_region(ops.weight, *values.shape).copy_(values)
            ops.weight_t = nm.dense_from_kept(values, idx, n, m) if dx == "dense" else None
        else:
            from kernels import transpose_values  # one Triton pass writes both values regions

            region_t = _values_region(ops.weight_t, ops.in_features, ops.out_features // 2)
            transpose_values(values, idx, keep_t, out=region_t, values_out=_values_region(ops.weight, *values.shape))
        ops.rebind(values, idx, keep_t)
        return ops

    def refreshes_in_place(self, ops: CompressedOperands) -> bool:
        """One Triton pass over both values regions, when no dense operand is in use."""
        return (ops.dx == "sparse" and not ops.dense and ops.source is not None
                and _inplace_layout_ok(ops.weight.dtype, ops.weight.device))

    def operand_addresses(self, ops: CompressedOperands) -> tuple[int, ...]:
        return ops.weight.data_ptr(), ops.weight_t.data_ptr()

    def release_sources(self, ops: CompressedOperands) -> CompressedOperands:
        ops.source = None
        ops.dense.clear()
        return ops

    def linear(self, ops: CompressedOperands, x2d, bias):
        plan = plan_for("fwd", x2d.shape[0], ops.in_features, ops.out_features, x2d.dtype)
        bias = None if bias is None else bias.to(x2d.dtype)
        if plan.dense and ops.source is not None:
            return torch.nn.functional.linear(x2d, ops.dense_operand("fwd"), bias)
        return _sparse_mm(ops.weight, x2d, bias, plan)

    def compresses_mvue(self, dy2d):
        return dy2d.is_cuda and _direct_compress_ok(dy2d, padded_tokens(dy2d.shape[0]))

    def grad_values(self, dy2d, x2d, idx, n, m, mvue_key=None, mvue_packed=None):
        """With ``mvue_key``: the MVUE weight gradient as a cuSPARSELt product (:meth:`mvue_grad_values`)
        on its plan's algorithm. Without: the exact gradient as its plan says (:meth:`exact_grad_values`)."""
        if mvue_key is None:
            if mvue_packed is not None:
                raise ValueError("grad_values: mvue_packed given without the mvue_key it was drawn with")
            return self.exact_grad_values(dy2d, x2d, idx, n, m)
        alg_id = 0
        if self.compresses_mvue(dy2d):
            alg_id = plan_for("dw_mvue", padded_tokens(dy2d.shape[0]), dy2d.shape[1], x2d.shape[1], x2d.dtype).alg_id
        return self.mvue_grad_values(dy2d, x2d, idx, n, m, mvue_key, mvue_packed, alg_id)

    def mvue_grad_values(self, dy2d: torch.Tensor, x2d: torch.Tensor, idx: torch.Tensor, n: int, m: int, mvue_key: int,
                         mvue_packed: torch.Tensor | None, alg_id: int) -> torch.Tensor:
        """The MVUE weight gradient ``dW = S(dYᵀ) X`` at the kept entries on cuSPARSELt's ``alg_id`` (the same
        numbers as the reference). Where the shapes compress unpadded, one Triton pass writes ``S(dYᵀ)``
        compressed (else cuSPARSELt compresses it), unless ``mvue_packed`` brings it; the product reads
        ``X`` as it is."""
        from . import cslt_binding

        padded = padded_tokens(dy2d.shape[0])
        x2d = torch.nn.functional.pad(x2d, (0, 0, 0, padded - x2d.shape[0])) if padded > x2d.shape[0] else x2d
        if self.compresses_mvue(dy2d):
            from kernels import mvue_compress

            packed = mvue_compress(dy2d, mvue_key, padded) if mvue_packed is None else mvue_packed
        elif mvue_packed is not None:
            raise ValueError("grad_values: mvue_packed given for a dY that compresses_mvue refuses")
        else:
            packed = torch._cslt_compress(mvue_grad_output(dy2d, mvue_key))
        if cslt_binding.available(x2d.dtype, x2d.device):
            dense = cslt_binding.sparse_mm(packed, x2d.contiguous(), None, False, alg_id, x_kn=True)
        else:
            dense = torch._cslt_sparse_mm(packed, x2d, alg_id=alg_id)  # (out, in) row-major
        return reduce_to_kept(dense, idx, n, m)

    def exact_grad_values(self, dy2d: torch.Tensor, x2d: torch.Tensor, idx: torch.Tensor, n: int, m: int
                          ) -> torch.Tensor:
        """``dYᵀX`` at the kept entries as its plan (role ``"dw"``) says: one Triton GEMM keeping them in
        its epilogue (:func:`kernels.weight_grad_kept`), or the dense product then a gather."""
        if x2d.dtype == dy2d.dtype:
            tile = plan_for("dw", dy2d.shape[0], dy2d.shape[1], x2d.shape[1], x2d.dtype).dw_tile
            if tile:
                from kernels import kept_grad

                config = kept_grad.TILES[tile]  # (load_plans drops plans naming tiles this version lacks)
                if kept_grad.kept_grad_applies(n, m, config):
                    return kept_grad.weight_grad_kept(dy2d, x2d, idx, n, m, config=config)
        return super().grad_values(dy2d, x2d, idx, n, m)

    def grad_input(self, ops: CompressedOperands, dy2d):
        if ops.weight_t is None:
            raise RuntimeError("this SparseLinear was prepared for inference only: it has no input-gradient operand")
        if ops.dx == "dense":  # no double pruning: (M⊙W)ᵀ is not 2:4 along out
            return dy2d.mm(ops.weight_t)
        plan = plan_for("dx", dy2d.shape[0], ops.out_features, ops.in_features, dy2d.dtype)
        if plan.dense and ops.source is not None:
            return torch.nn.functional.linear(dy2d, ops.dense_operand("dx"))
        return _sparse_mm(ops.weight_t, dy2d, None, plan)


def _sparse_mm(packed: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """``x2d @ Aᵀ (+ bias)`` for a compressed ``A``: contiguous ``(tokens, rows of A)``.

    Runs on the cached cuSPARSELt plans of :mod:`.cslt_binding` where that binding works,
    else on ``torch._cslt_sparse_mm`` (same descriptors and algorithm, same result; without the
    plan's split-k, which only the binding's tuning chooses); a
    ``skinny`` plan on :func:`kernels.skinny_sparse_mm` where it reads the operand (``mma``: on
    :func:`kernels.skinny_mma_sparse_mm`, where the token count and ``x2d``'s alignment let it).
    """
    from . import cslt_binding

    if not x2d.is_contiguous():  # (contiguous() itself is a dispatched op: host time a decoding step pays)
        x2d = x2d.contiguous()
    if plan.skinny and skinny_applies(packed.shape[0], x2d.shape[1], x2d.dtype, x2d.device):
        from kernels import skinny_mma, skinny_sparse_mm

        # shapes and dtypes hold: the backend made them (a plan tuned at T tokens serves up to 2T: the
        # sparse tensor cores' kernel takes up to 16, from a 16-byte aligned x2d)
        if plan.mma and x2d.shape[0] <= skinny_mma.MAX_TOKENS and skinny_mma.aligned(packed, x2d):
            return skinny_mma.skinny_mma_sparse_mm(packed, x2d, bias, validate=False)
        return skinny_sparse_mm(packed, x2d, bias, validate=False)
    tokens = x2d.shape[0]
    pad = (-tokens) % _TOKEN_MULTIPLE
    dense = torch.nn.functional.pad(x2d, (0, 0, 0, pad)) if pad else x2d
    if cslt_binding.available(dense.dtype, dense.device):
        out = cslt_binding.sparse_mm(packed, dense, bias, plan.transpose_result, plan.alg_id, split_k=plan.split_k,
                                     split_k_mode=plan.split_k_mode)
    else:
        out = torch._cslt_sparse_mm(packed, dense.t(), bias=bias, transpose_result=plan.transpose_result,
                                    alg_id=plan.alg_id)
    out = out if plan.transpose_result else out.t().contiguous()
    return out[:tokens] if pad else out
