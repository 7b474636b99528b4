"""Per-shape execution plans for the cuSPARSELt products.

A plan says how one sparse product of a given shape runs: cuSPARSELt's algorithm id,
its split-k, and whether the result comes back transposed by cuSPARSELt itself or by a
copy. Plans default to cuSPARSELt's own choice; ``bench/tune.py`` measures the
alternatives per shape and ``load_plans`` installs its choices.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Plan:
    alg_id: int = 0
    split_k: int = 1
    transpose_result: bool = True


DEFAULT_PLAN = Plan()
_PLANS: dict[tuple[str, int, int, int, str], Plan] = {}


def plan_key(role: str, tokens: int, k: int, n: int, dtype: torch.dtype) -> tuple[str, int, int, int, str]:
    """Key of a product ``(tokens, k) x (k, n)``; ``role`` is ``"fwd"`` or ``"dx"``."""
    return (role, tokens, k, n, str(dtype).removeprefix("torch."))


def plan_for(role: str, tokens: int, k: int, n: int, dtype: torch.dtype) -> Plan:
    """The installed plan for this product, or cuSPARSELt's default."""
    return _PLANS.get(plan_key(role, tokens, k, n, dtype), DEFAULT_PLAN)


def set_plan(role: str, tokens: int, k: int, n: int, dtype: torch.dtype, plan: Plan) -> None:
    _PLANS[plan_key(role, tokens, k, n, dtype)] = plan


def save_plans(path: str | os.PathLike) -> None:
    """Write the installed plans as JSON (atomically)."""
    rows = [dict(zip(("role", "tokens", "k", "n", "dtype"), key), **asdict(plan)) for key, plan in _PLANS.items()]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def load_plans(path: str | os.PathLike) -> int:
    """Install the plans of a JSON file written by :func:`save_plans`; returns how many."""
    with open(path) as f:
        rows = json.load(f)
    for row in rows:
        key = (row["role"], int(row["tokens"]), int(row["k"]), int(row["n"]), row["dtype"])
        _PLANS[key] = Plan(int(row["alg_id"]), int(row["split_k"]), bool(row["transpose_result"]))
    return len(rows)
