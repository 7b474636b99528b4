"""Measure, per product shape, the fastest way to run a sparse layer's GEMM, and pick it.

A product is ``x2d (tokens, k) @ Aᵀ`` with ``A (rows, k)`` 2:4 along ``k``: the forward
(``A = W``) or the input gradient (``A = W̃ᵀ``). The candidates are cuSPARSELt's
algorithms with the result written transposed or not, run exactly as the backend runs
them (:func:`dsparse.backends.cusparselt._sparse_mm`), up to :data:`SPLIT_K_TOKENS` tokens
cuSPARSELt's split-k too before Hopper (a few tokens make few output tiles: splitting the reduction
fills the GPU; algorithm 0 at :data:`SPLIT_K` factors in either mode, and what cuSPARSELt's own
search picks), up to :data:`kernels.skinny.MAX_TOKENS`
tokens dsparse's few-token kernels on the same operand (:func:`kernels.skinny_sparse_mm`, and
:func:`kernels.skinny_mma_sparse_mm` on the sparse tensor cores up to its 16 tokens),
and a dense GEMM on the decompressed ``A`` (what dsparse falls back to where sparse loses,
e.g. on small layers that are launch-bound). A short eager screen times every cuSPARSELt
algorithm with the transposed result and algorithm 0 untransposed (on an H100 the
untransposed layout was never within 30% of the best); the fastest few, the default, the
few-token kernel and the dense GEMM are then timed again. Results are checked against algorithm 0, so a broken algorithm is never
chosen; times are eager (launch overhead included), which is what a training step pays.

The MVUE weight gradient (``S(dYᵀ) X``, :func:`tune_mvue_dw`) is tuned the same way over
cuSPARSELt's algorithms and against the exact gradient (where that is faster, products take it),
and the exact one (:func:`tune_weight_grad`) between cuBLAS's dense ``dYᵀX`` with a gather of the
kept entries and the fused Triton GEMM's tiles. Used on first sight of an untuned shape by
:func:`dsparse.backends.plans.plan_for`, and by ``python -m bench.tune`` (with CUDA-graph timing of
the finalists) to ship plans.
"""
from __future__ import annotations

from dataclasses import asdict, replace

import torch

from .. import nm
from ..timing import time_ms
from .plans import DEFAULT_PLAN, Plan

SCREEN = {"warmup": 0, "iters": 3, "inner": 1}  # every candidate, eager, after a first call checked its result
FINAL = {"warmup": 2, "iters": 7, "inner": 5}  # the finalists
FINALISTS, NEAR = 4, 1.10  # re-time up to this many screened candidates within 10% of the fastest
MAX_ERROR = 1e-2  # relative to algorithm 0's result
SPLIT_K_TOKENS = 64  # up to this many tokens cuSPARSELt's split-k is a candidate
SPLIT_K = (2, 4, 8, 16)  # its factors tried with algorithm 0
SPLIT_K_MODES = (1, 2)  # cusparseLtSplitKMode_t: the reduction in the product's kernel, or in a second one
SPLIT_K_BEFORE = 9  # compute capability from which cuSPARSELt refuses every factor in [2, K] (see split_k_factors_taken)


def alg_count(packed: torch.Tensor, x: torch.Tensor) -> int:
    """How many algorithm ids to try: the fewer cuSPARSELt offers of the two result layouts
    (it offers fp16 ids with a transposed result that crash: see ``cslt_binding.alg_count``)."""
    from . import cslt_binding

    if cslt_binding.available(x.dtype, x.device):
        return min(cslt_binding.alg_count(packed.shape[0], x.shape[1], x.shape[0], x.dtype, transpose)
                   for transpose in (False, True))
    return int(torch._C._cusparselt.mm_search(packed, x.t(), None, None, None, False)[3])


def tune_product(rows: int, k: int, tokens: int, dtype: torch.dtype, *, graph: bool = False,
                 dense: bool = True) -> tuple[Plan, list[dict]]:
    """The fastest plan for ``x (tokens, k) @ Aᵀ``, ``A (rows, k)`` 2:4, on the current GPU, and every timing.

    ``graph``: time the finalists as CUDA graph replays (kernels alone) instead of eagerly.
    ``dense``: include the dense GEMM as a candidate.
    """
    from kernels import skinny_mma
    from kernels.skinny import MAX_TOKENS

    from .cusparselt import _compress_slots, _sparse_mm, skinny_applies

    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (dropout, data) untouched
    w = torch.randn(rows, k, device=device, dtype=dtype, generator=gen)
    idx = nm.kept_positions(nm.nm_mask(w.abs().float(), 2, 4), 2, 4)
    kept = nm.gather_kept(w, idx, 4)
    packed = _compress_slots(kept, idx)
    w_dense = nm.dense_from_kept(kept, idx, 2, 4).contiguous()
    x = torch.randn(tokens, k, device=device, dtype=dtype, generator=gen)
    want = _sparse_mm(packed, x, None, Plan(0, False)).float()

    def run(plan: Plan) -> torch.Tensor:
        return torch.nn.functional.linear(x, w_dense) if plan.dense else _sparse_mm(packed, x, None, plan)

    candidates = [Plan(alg, True) for alg in range(alg_count(packed, x))] + [Plan(0, False)]
    if tokens <= SPLIT_K_TOKENS:
        candidates += split_k_candidates(packed, x)
    if tokens <= MAX_TOKENS and skinny_applies(rows, k, dtype, device):
        candidates.append(Plan(skinny=True))
        if tokens <= skinny_mma.MAX_TOKENS and skinny_mma.available(device):
            candidates.append(Plan(skinny=True, mma=True))
    return _pick(candidates + ([Plan(dense=True)] if dense else []), run, want, graph)


def split_k_factors_taken(device: torch.device) -> bool:
    """Whether cuSPARSELt takes split-k factors in [2, K] on ``device``. From Hopper on it takes only 1 (none)
    or -1 (its segment-K): on an H200 every factor 2-16 in either mode failed with "invalid value"
    (bench/results/tune_h200_decode.json). Segment-K is left out until a GPU run shows its plans
    initialize and compute algorithm 0's result."""
    return torch.cuda.get_device_capability(device)[0] < SPLIT_K_BEFORE


def split_k_candidates(packed: torch.Tensor, x: torch.Tensor) -> list[Plan]:
    """cuSPARSELt split-k plans for ``x @ Aᵀ`` (transposed result): algorithm 0 at each of :data:`SPLIT_K`
    in each of :data:`SPLIT_K_MODES`, and the algorithm and split cuSPARSELt's own search picks where
    it splits (only where cuSPARSELt offers both result layouts the same algorithm ids: the search
    would run the extra ids, which have crashed). Only the binding runs split-k: none without it, and
    none where cuSPARSELt refuses the factors (:func:`split_k_factors_taken`)."""
    from . import cslt_binding

    if not cslt_binding.available(x.dtype, x.device):
        return []
    if not split_k_factors_taken(x.device):
        return []
    plans = [Plan(0, True, split_k=split, split_k_mode=mode) for split in SPLIT_K for mode in SPLIT_K_MODES]
    pad = (-x.shape[0]) % 8  # as _sparse_mm pads the tokens
    counts = {cslt_binding.alg_count(packed.shape[0], x.shape[1], x.shape[0] + pad, x.dtype, transpose)
              for transpose in (False, True)}
    if len(counts) > 1:  # ids offered for one layout only (fp16, transposed result) crashed a search: see alg_count
        return plans
    try:
        alg, split, mode, _ = torch._C._cusparselt.mm_search(packed, torch.nn.functional.pad(x, (0, 0, 0, pad)).t(),
                                                             None, None, None, True)
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a torch whose search differs: the grid alone
        return plans
    searched = Plan(int(alg), True, split_k=int(split), split_k_mode=int(mode))
    return plans + ([searched] if searched.split_k > 1 and searched not in plans else [])


def tune_mvue_dw(rows: int, cols: int, tokens: int, dtype: torch.dtype, *, graph: bool = False
                 ) -> tuple[Plan, list[dict]]:
    """The fastest way to the MVUE weight gradient ``S(dYᵀ) (rows, tokens) @ X (tokens, cols)`` at the kept
    entries on the current GPU, and every timing: each cuSPARSELt algorithm, timed whole as the backend
    runs it (``S(dYᵀ)`` compressed by :func:`kernels.mvue_compress`, the product reading ``X`` as it is,
    the gather of the kept entries), against the exact gradient as its own plan runs it. The plan names
    the fastest algorithm, and ``dense`` where the exact gradient is faster still (:func:`.plans.mvue_pays`)."""
    from . import BACKENDS, cslt_binding

    device = torch.device("cuda", torch.cuda.current_device())
    if not cslt_binding.available(dtype, device):
        return Plan(), []  # torch's op then runs it on algorithm 0
    gen = torch.Generator(device=device).manual_seed(0)
    dy = torch.randn(tokens, rows, device=device, dtype=dtype, generator=gen)
    x = torch.randn(tokens, cols, device=device, dtype=dtype, generator=gen)
    idx = nm.kept_positions(nm.nm_mask(torch.rand(rows, cols, device=device, generator=gen), 2, 4), 2, 4)
    backend = BACKENDS["cusparselt"]

    def run(plan: Plan) -> torch.Tensor:
        if plan.dense:
            return backend.exact_grad_values(dy, x, idx, 2, 4)
        return backend.mvue_grad_values(dy, x, idx, 2, 4, 0, None, plan.alg_id)

    count = cslt_binding.alg_count(rows, tokens, cols, dtype, False)
    table = _time([Plan(alg) for alg in range(count)], run, run(DEFAULT_PLAN).float(), graph,
                  keep=lambda r: Plan.from_row(r) == DEFAULT_PLAN)
    exact = {**asdict(Plan(dense=True)), "ms": time_ms(lambda: run(Plan(dense=True)), **FINAL, graph=graph)}
    best = min((r for r in table if "ms" in r), key=lambda r: r["ms"])
    return replace(Plan.from_row(best), dense=exact["ms"] < best["ms"]), table + [exact]


def tune_weight_grad(rows: int, cols: int, tokens: int, dtype: torch.dtype, *, graph: bool = False
                     ) -> tuple[Plan, list[dict]]:
    """The fastest way to the exact weight gradient ``dYᵀ (rows, tokens) @ X (tokens, cols)`` at the
    kept 2:4 entries, on the current GPU, and every timing: cuBLAS's dense product then
    :func:`kernels.gather_kept` (the default plan), or :func:`kernels.weight_grad_kept` on each of its
    tiles (``Plan(dw_tile=name)``)."""
    from kernels import weight_grad_kept
    from kernels.kept_grad import TILES, kept_grad_applies

    from .base import reduce_to_kept

    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)
    dy = torch.randn(tokens, rows, device=device, dtype=dtype, generator=gen)
    x = torch.randn(tokens, cols, device=device, dtype=dtype, generator=gen)
    idx = nm.kept_positions(nm.nm_mask(torch.rand(rows, cols, device=device, generator=gen), 2, 4), 2, 4)

    def run(plan: Plan) -> torch.Tensor:
        if plan.dw_tile:
            return weight_grad_kept(dy, x, idx, 2, 4, config=TILES[plan.dw_tile])
        return reduce_to_kept(dy.t().mm(x), idx, 2, 4)

    candidates = [DEFAULT_PLAN] + [Plan(dw_tile=name) for name, c in TILES.items() if kept_grad_applies(2, 4, c)]
    table = _time(candidates, run, run(DEFAULT_PLAN).float(), graph, keep=lambda r: Plan.from_row(r) == DEFAULT_PLAN)
    return Plan.from_row(min((r for r in table if "ms" in r), key=lambda r: r["ms"])), table


def _time(candidates: list[Plan], run, want: torch.Tensor, graph: bool, keep) -> list[dict]:
    """Screen ``candidates`` (results checked against ``want``), then re-time the fastest few and those
    rows ``keep`` names: the table of every candidate, with ``ms`` for the finalists."""
    from triton.errors import TritonError

    table: list[dict] = []
    for plan in candidates:
        row = asdict(plan)
        try:
            err = ((run(plan).float() - want).norm() / want.norm()).item()
            if err > MAX_ERROR:
                row["error"] = f"wrong result: relative error {err:.2g} from the default plan"
            else:
                row["screen_ms"] = time_ms(lambda: run(plan), **SCREEN)
        except (RuntimeError, TritonError) as e:  # unsupported here (an algorithm, a tile's shared memory, a build)
            row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        table.append(row)
    screened = sorted((r for r in table if "screen_ms" in r), key=lambda r: r["screen_ms"])
    finalists = [r for r in screened[:FINALISTS] if r["screen_ms"] <= NEAR * screened[0]["screen_ms"]]
    finalists += [r for r in table if "screen_ms" in r and r not in finalists and keep(r)]
    for r in finalists:
        r["ms"] = time_ms(lambda: run(Plan.from_row(r)), **FINAL, graph=graph)
    return table


def _pick(candidates: list[Plan], run, want: torch.Tensor, graph: bool) -> tuple[Plan, list[dict]]:
    """Time ``candidates`` (:func:`_time`; the default, the skinny kernel and the dense GEMM always among
    the finalists, to compare) and return the best: ``dense`` if it beats every sparse way, ``skinny``
    if that kernel beats cuSPARSELt, and cuSPARSELt's best algorithm either way (what runs where the
    others cannot)."""
    table = _time(candidates, run, want, graph, keep=lambda r: r["dense"] or r["skinny"] or Plan.from_row(r) == DEFAULT_PLAN)
    finalists = [r for r in table if "ms" in r]
    best_cslt = min((r for r in finalists if not (r["dense"] or r["skinny"])), key=lambda r: r["ms"])
    best_sparse = min((r for r in finalists if not r["dense"]), key=lambda r: r["ms"])
    best = min(finalists, key=lambda r: r["ms"])
    return replace(Plan.from_row(best_cslt), dense=best["dense"], skinny=best_sparse["skinny"], mma=best_sparse["mma"]), table
