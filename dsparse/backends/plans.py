"""Per-shape execution plans for a sparse layer's products (forward, input gradient, weight gradient).

A plan says how one product runs: cuSPARSELt's algorithm id (and split-k, for few tokens)
and whether cuSPARSELt writes the result transposed (row-major ``(tokens, features)``) or the
backend copies it there, or dsparse's own few-token kernel on the same compressed operand (decoding), or a
dense GEMM on the decompressed operand where that is faster (small, launch-bound layers;
not for frozen inference models, which keep only the compressed operand). The exact weight
gradient's plan says whether cuBLAS's dense ``dYᵀX`` and a gather of the kept entries run, or
one Triton GEMM that keeps them in its epilogue (:func:`kernels.weight_grad_kept`, and on which
tile); the MVUE weight gradient's plan, its algorithm, or ``dense`` where the exact gradient measured
faster than compressing ``S(dYᵀ)`` and its sparse GEMM (:func:`mvue_pays`: such products then take the
exact gradient, the lower-variance one). Plans are chosen by measurement (:mod:`.tuning`) and load once per
process: first the tuned plans shipped for this GPU and cuSPARSELt version
(``dsparse/backends/tuned/``), then the user's cache (:func:`default_cache_path`,
overridable with ``DSPARSE_PLANS``). A product uses the plan tuned for its shape at the
nearest token count within a factor of two. A shape seen for the first time is tuned on
the spot, once, and the choice is added to the user's cache, so no product ever runs on
an unmeasured guess; ``DSPARSE_AUTOTUNE=0`` turns that off (such products then run on
cuSPARSELt's default, algorithm 0 untransposed, and the weight gradient unfused). Timing differs
from rank to rank, so a training engine makes its ranks agree after their first step
(:func:`dsparse.distributed.agree_plans`: rank 0's plan for every product any rank has run, through
:func:`looked_up`, :func:`rows_for` and :func:`install_rows`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, fields

import torch

from .base import padded_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    alg_id: int = 0
    transpose_result: bool = False
    dense: bool = False  # faster as a dense GEMM on the decompressed operand (the rest: the best sparse way)
    skinny: bool = False  # dsparse's few-token kernel on the compressed operand (kernels.skinny_sparse_mm)
    mma: bool = False  # with skinny: its CUDA kernel on the sparse tensor cores (kernels.skinny_mma_sparse_mm)
    split_k: int = 1  # cuSPARSELt's split-k factor for ``alg_id`` (1: none): few-token products fill the GPU
    split_k_mode: int = 0  # with split_k: cusparseLtSplitKMode_t (1: one kernel, 2: two kernels; 0: cuSPARSELt's)
    dw_tile: str = ""  # role "dw": kernels.weight_grad_kept on this tile (a key of kernels.kept_grad.TILES);
    # empty: cuBLAS's dYᵀX, then kernels.gather_kept

    @classmethod
    def from_row(cls, row: dict) -> "Plan":
        """The plan a JSON row or tuning-table row names (fields it lacks, e.g. from older files: their defaults)."""
        return cls(**{f.name: type(f.default)(row[f.name]) for f in fields(cls) if f.name in row})


DEFAULT_PLAN = Plan()
TOKEN_REACH = 2.0  # a plan tuned at T tokens serves products of T / 2 .. 2 T tokens
_PLANS: dict[tuple[str, int, int, str], dict[int, Plan]] = {}  # (role, k, n, dtype) -> {tokens: plan}
_CHOSEN: dict[tuple[str, int, int, int, str], Plan] = {}  # (role, tokens, k, n, dtype) -> plan: the hot-path memo
_SEEN: set[tuple[str, int, int, int, str]] = set()  # every (role, tokens, k, n, dtype) looked up (_CHOSEN is reset)
_LOCK = threading.RLock()  # the backward runs on autograd's thread
_loaded = False
_default_only = False
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def _shape_key(role: str, k: int, n: int, dtype: torch.dtype | str) -> tuple[str, int, int, str]:
    return (role, int(k), int(n), str(dtype).removeprefix("torch."))


def plan_for(role: str, tokens: int, k: int, n: int, dtype: torch.dtype) -> Plan:
    """The plan for ``(tokens, k) x (k, n)``; ``role`` is ``"fwd"`` or ``"dx"``, or ``"dw"`` / ``"dw_mvue"``
    for the weight gradient ``dYᵀ (k, tokens) x X (tokens, n)`` / ``S(dYᵀ) (k, tokens) x X``. Tunes unseen
    shapes (see module doc)."""
    if _default_only:
        return DEFAULT_PLAN
    memo_key = (role, tokens, k, n, dtype)
    plan = _CHOSEN.get(memo_key)
    if plan is None:
        with _LOCK:
            plan = _choose(role, tokens, k, n, dtype)
            _CHOSEN[memo_key] = plan
            _SEEN.add(memo_key)
    return plan


def mvue_pays(tokens: int, k: int, n: int, dtype: torch.dtype) -> bool:
    """Whether the MVUE weight gradient ``S(dYᵀ) (k, tokens) x X (tokens, n)`` is worth running: false where
    its plan (role ``"dw_mvue"``, at the padded token count it runs at) says ``dense``, the exact gradient
    having measured faster (small products, where compressing ``S(dYᵀ)`` costs more than its GEMM saves)."""
    return not plan_for("dw_mvue", padded_tokens(tokens), k, n, dtype).dense


def chosen() -> list[dict]:
    """Every product this process has looked a plan up for, with the plan it ran: rows of role, tokens,
    k, n, dtype and the plan's fields (the provenance a benchmark records)."""
    with _LOCK:
        return [_row(_shape_key(role, k, n, dtype), tokens, plan) for (role, tokens, k, n, dtype), plan in _CHOSEN.items()]


def looked_up() -> list[tuple[str, int, int, int, str]]:
    """Every product this process has looked a plan up for, as sorted ``(role, tokens, k, n, dtype)`` keys
    with the dtype's name (picklable and comparable: what ranks exchange to agree on plans)."""
    with _LOCK:
        keys = {(_shape_key(role, k, n, dtype), int(tokens)) for role, tokens, k, n, dtype in _SEEN}
        return sorted((role, tokens, k, n, dtype) for (role, k, n, dtype), tokens in keys)


def rows_for(keys: list[tuple[str, int, int, int, str]]) -> list[dict]:
    """This process's plan for each ``(role, tokens, k, n, dtype)`` key (tuning where it has none), as
    rows for :func:`install_rows`; with them, the plan of every product their tuning looked up (the exact
    weight gradient an MVUE plan is timed against, which ranks run where that plan says ``dense``)."""
    before = set(looked_up())
    for role, tokens, k, n, dtype in keys:
        plan_for(role, tokens, k, n, getattr(torch, dtype))
    wanted = sorted(set(keys) | (set(looked_up()) - before))
    return [_row(_shape_key(role, k, n, dtype), tokens, plan_for(role, tokens, k, n, getattr(torch, dtype)))
            for role, tokens, k, n, dtype in wanted]


def install_rows(rows: list[dict], source: str) -> int:
    """Install plan rows (a plan file's, or another rank's :func:`rows_for`) at their token counts; returns
    how many. A weight-gradient plan naming a tile this version's kernels lack (a file from another version)
    is left out, so its shape is tuned again on first use."""
    from kernels.kept_grad import TILES

    installed = 0
    for row in rows:
        plan = Plan.from_row(row)
        if plan.dw_tile and plan.dw_tile not in TILES:
            log.warning("dsparse: %s: left out a weight-gradient plan on tile %r, which kernels.kept_grad.TILES "
                        "lacks (a plan file from another version); that shape is tuned again on first use",
                        source, plan.dw_tile)
            continue
        set_plan(row["role"], row["tokens"], row["k"], row["n"], row["dtype"], plan)
        installed += 1
    return installed


def _row(key: tuple[str, int, int, str], tokens: int, plan: Plan) -> dict:
    """A plan as a JSON row: its product's role, tokens, k, n and dtype, then its fields."""
    return {"role": key[0], "tokens": tokens, "k": key[1], "n": key[2], "dtype": key[3], **asdict(plan)}


def _choose(role: str, tokens: int, k: int, n: int, dtype: torch.dtype) -> Plan:
    ensure_loaded()
    plan = _tuned(role, tokens, k, n, dtype)
    if plan is not None:
        return plan
    if not (autotune_enabled() and torch.cuda.is_available()) or torch.cuda.is_current_stream_capturing():
        return DEFAULT_PLAN
    from .tuning import tune_mvue_dw, tune_product, tune_weight_grad

    tune = {"dw": tune_weight_grad, "dw_mvue": tune_mvue_dw}.get(role)
    plan, _ = tune(k, n, _bucket(tokens), dtype) if tune else tune_product(n, k, _bucket(tokens), dtype)
    log.info("dsparse: tuned %s (tokens %d, k %d, n %d, %s): %s", role, tokens, k, n, dtype, plan)
    set_plan(role, _bucket(tokens), k, n, dtype, plan)
    try:
        save_plans(default_cache_path())
    except OSError as e:  # a read-only home: the plan still holds for this process
        log.warning("dsparse: could not cache tuned plans at %s: %s", default_cache_path(), e)
    return plan


def _tuned(role: str, tokens: int, k: int, n: int, dtype: torch.dtype) -> Plan | None:
    by_tokens = _PLANS.get(_shape_key(role, k, n, dtype))
    if not by_tokens:
        return None
    nearest = min(by_tokens, key=lambda t: (abs(t - tokens), t))
    return by_tokens[nearest] if nearest / TOKEN_REACH <= tokens <= nearest * TOKEN_REACH else None


def _bucket(tokens: int) -> int:
    """The token count a new plan is tuned at: the next power of two (at least 8), so a run
    with varying token counts tunes a few buckets, not every count."""
    return max(8, 1 << (max(tokens, 1) - 1).bit_length())


def autotune_enabled() -> bool:
    """Whether unseen shapes are tuned on first use (``DSPARSE_AUTOTUNE=0`` turns it off)."""
    return os.environ.get("DSPARSE_AUTOTUNE", "1") != "0"


def set_plan(role: str, tokens: int, k: int, n: int, dtype: torch.dtype | str, plan: Plan) -> None:
    """Install ``plan`` for a product shape at ``tokens`` (and forget earlier choices made from the old table)."""
    with _LOCK:
        _PLANS.setdefault(_shape_key(role, k, n, dtype), {})[int(tokens)] = plan
        _CHOSEN.clear()


def clear_plans() -> None:
    """Forget every installed plan (the next product loads the shipped plans and cache again)."""
    global _loaded
    with _LOCK:
        _PLANS.clear()
        _CHOSEN.clear()
        _SEEN.clear()
        _loaded = False


@contextlib.contextmanager
def default_plans_only():
    """Run every product on cuSPARSELt's default plan inside the block (no tuned plans, no
    tuning; the weight gradient unfused): the benchmarks' untuned baseline."""
    global _default_only
    previous, _default_only = _default_only, True
    try:
        yield
    finally:
        _default_only = previous


def device_key() -> str:
    """GPU name and cuSPARSELt version: what algorithm ids and their speed depend on."""
    gpu = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    cslt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else "none"
    return f"{gpu}_cusparselt{cslt}"


def default_cache_path() -> str:
    """Where this GPU's tuned plans are cached (``DSPARSE_PLANS`` overrides)."""
    if os.environ.get("DSPARSE_PLANS"):
        return os.environ["DSPARSE_PLANS"]
    root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dsparse")
    return os.path.join(root, f"plans_{device_key()}.json")


def save_plans(path: str | os.PathLike) -> None:
    """Write the installed plans as JSON (atomically)."""
    rows = [_row(key, tokens, plan) for key, by_tokens in _PLANS.items() for tokens, plan in by_tokens.items()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # ranks sharing a file system each write their own, then replace
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def load_plans(path: str | os.PathLike) -> int:
    """Install the plans of a JSON file written by :func:`save_plans` (:func:`install_rows`); returns how many."""
    global _loaded
    with open(path) as f:
        installed = install_rows(json.load(f), str(path))
    _loaded = True
    return installed


def ensure_loaded() -> None:
    """Load the shipped plans and the user's cache, unless this process already has (before installing
    rows that must not be overwritten by a later first load)."""
    if not _loaded:
        load_default_plans()


def load_default_plans() -> None:
    """Load the shipped plans for this GPU and the user's cache once, where they exist."""
    global _loaded
    _loaded = True
    for path in (os.path.join(TUNED_DIR, f"plans_{device_key()}.json"), default_cache_path()):
        if os.path.exists(path):
            load_plans(path)
