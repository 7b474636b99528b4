"""Per-shape execution plans for the cuSPARSELt products.

A plan says how one sparse product runs: cuSPARSELt's algorithm id and whether
cuSPARSELt writes the result transposed (row-major ``(tokens, features)``) or the backend
copies it there. ``python -m bench.tune`` times every alternative per shape and saves the
winners. Plans load once per process: first the tuned plans shipped for this GPU and
cuSPARSELt version (``dsparse/backends/tuned/``), then the user's cache
(:func:`default_cache_path`, overridable with ``DSPARSE_PLANS``). A product whose token
count was not tuned uses the plan of the nearest tuned count; a shape never tuned uses the
plan that won most often for its role and dtype on this GPU; without any tuned plans,
cuSPARSELt's default (algorithm 0, untransposed result).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Plan:
    alg_id: int = 0
    transpose_result: bool = False


DEFAULT_PLAN = Plan()
_PLANS: dict[tuple[str, int, int, str], dict[int, Plan]] = {}  # (role, k, n, dtype) -> {tokens: plan}
_loaded = False
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def _shape_key(role: str, k: int, n: int, dtype: torch.dtype | str) -> tuple[str, int, int, str]:
    return (role, int(k), int(n), str(dtype).removeprefix("torch."))


def plan_for(role: str, tokens: int, k: int, n: int, dtype: torch.dtype) -> Plan:
    """The plan for ``(tokens, k) x (k, n)``; ``role`` is ``"fwd"`` or ``"dx"``."""
    if not _loaded:
        load_default_plans()
    by_tokens = _PLANS.get(_shape_key(role, k, n, dtype))
    if not by_tokens:
        return _most_common(role, str(dtype).removeprefix("torch."))
    nearest = min(by_tokens, key=lambda t: (abs(t - tokens), t))
    return by_tokens[nearest]


def _most_common(role: str, dtype: str) -> Plan:
    wins: dict[Plan, int] = {}
    for (r, _, _, d), by_tokens in _PLANS.items():
        if r == role and d == dtype:
            for plan in by_tokens.values():
                wins[plan] = wins.get(plan, 0) + 1
    return max(wins, key=lambda p: (wins[p], -p.alg_id)) if wins else DEFAULT_PLAN


def set_plan(role: str, tokens: int, k: int, n: int, dtype: torch.dtype | str, plan: Plan) -> None:
    _PLANS.setdefault(_shape_key(role, k, n, dtype), {})[int(tokens)] = plan


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
    rows = [{"role": key[0], "tokens": tokens, "k": key[1], "n": key[2], "dtype": key[3], **asdict(plan)}
            for key, by_tokens in _PLANS.items() for tokens, plan in by_tokens.items()]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def load_plans(path: str | os.PathLike) -> int:
    """Install the plans of a JSON file written by :func:`save_plans`; returns how many."""
    global _loaded
    with open(path) as f:
        rows = json.load(f)
    for row in rows:
        set_plan(row["role"], row["tokens"], row["k"], row["n"], row["dtype"],
                 Plan(int(row["alg_id"]), bool(row["transpose_result"])))
    _loaded = True
    return len(rows)


def load_default_plans() -> None:
    """Load the shipped plans for this GPU and the user's cache once, where they exist."""
    global _loaded
    _loaded = True
    for path in (os.path.join(TUNED_DIR, f"plans_{device_key()}.json"), default_cache_path()):
        if os.path.exists(path):
            load_plans(path)
