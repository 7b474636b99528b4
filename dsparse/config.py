"""dsparse's sections of a DeepSpeed config (``"sparsity"``, ``"fusion"``, ``"autograd"``, ``"step"``), validated with
errors that name the fix.

Example (every key optional)::

    "sparsity": {
        "pattern": "2:4",
        "include": ["\\\\.mlp\\\\.", "\\\\.self_attn\\\\."],
        "exclude": ["layers\\\\.0\\\\."],
        "layer_patterns": [{"match": "layers\\\\.(2[0-9]|3[01])\\\\.", "pattern": "2:8"}],
        "backend": "auto",
        "mask_change_freq": 100,
        "compress": true,
        "dense_warmup_steps": 0,
        "total_steps": 10000,
        "adapters": {"rank_fraction": 0.0156, "alpha": 1.0, "start": 0.99, "weight_decay": 0.0}
    },
    "fusion": {"enabled": "auto", "rms_norm": true, "swiglu": true, "rope": true, "min_rows": 256},
    "autograd": {"multithreading": false},
    "step": {"sync_free": true}
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .backends import check_backend_name
from .nm import parse_pattern


def _check_keys(section: str, given: dict[str, Any], allowed: list[str]) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
            raise ValueError(f"unknown key {key!r} in {section}{hint}")


def _check_bool(key: str, value: Any, allowed: str = "true or false") -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be {allowed}, got {value!r}")


def _compile(patterns: list[str], key: str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"sparsity.{key}: {p!r} is not a valid regular expression ({e})") from None
    return out


@dataclass
class AdapterConfig:
    """SLoPe's lazy low-rank adapters, added for the last part of training."""

    rank: int | None = None  # explicit rank; else rank_fraction * min(in, out) of each layer
    rank_fraction: float = 0.0156
    alpha: float = 1.0  # output scale alpha / rank (the reference uses 1 / rank)
    start: float = 0.99  # fraction of total_steps after which adapters train
    start_step: int | None = None  # or an explicit optimizer step
    weight_decay: float = 0.0
    seed: int = 1234  # adapters' random factor; identical on every rank

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"sparsity.adapters.rank must be >= 1, got {self.rank}")
        if not 0.0 < self.rank_fraction <= 1.0:
            raise ValueError(f"sparsity.adapters.rank_fraction must be in (0, 1], got {self.rank_fraction}")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"sparsity.adapters.start is a fraction of training in [0, 1], got {self.start}")
        if self.start_step is not None and self.start_step < 0:
            raise ValueError(f"sparsity.adapters.start_step must be >= 0, got {self.start_step}")

    def rank_for(self, in_features: int, out_features: int) -> int:
        if self.rank is not None:
            return self.rank
        return max(1, round(self.rank_fraction * min(in_features, out_features)))


@dataclass
class SparsityConfig:
    """Which layers become N:M sparse, and how they train."""

    enabled: bool = True
    pattern: str = "2:4"
    include: list[str] = field(default_factory=lambda: [".*"])
    exclude: list[str] = field(default_factory=list)
    layer_patterns: list[dict[str, str]] = field(default_factory=list)  # [{"match": regex, "pattern": "N:M"}]
    exclude_output_head: bool = True
    skip_incompatible: bool = False  # log-and-skip layers that cannot be sparsified instead of raising
    backend: str = "auto"
    mask_change_freq: int = 100
    double_prune: bool = True  # False: dX uses (M⊙W)ᵀ itself, a dense GEMM (single-pruned static N:M)
    compress: bool = True
    dense_warmup_steps: int = 0
    total_steps: int | None = None
    check_masks: bool = True  # checksum all-reduce at mask changes: every rank must agree
    mvue_dw: bool = False  # weight gradient from an unbiased (MVUE) 2:4 sparsification of dYᵀ (FST)
    adapters: AdapterConfig | None = None

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        self.include = [self.include] if isinstance(self.include, str) else list(self.include)
        self.exclude = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude)
        self._include = _compile(self.include, "include")
        self._exclude = _compile(self.exclude, "exclude")
        self._layer_patterns = []
        for i, rule in enumerate(self.layer_patterns):
            if not isinstance(rule, dict):
                raise ValueError(f"sparsity.layer_patterns[{i}] must be an object "
                                 '{"match": "<regex>", "pattern": "N:M"}')
            _check_keys(f"sparsity.layer_patterns[{i}]", rule, ["match", "pattern"])
            if "match" not in rule or "pattern" not in rule:
                raise ValueError(f"sparsity.layer_patterns[{i}] needs both 'match' and 'pattern'")
            (regex,) = _compile([rule["match"]], f"layer_patterns[{i}].match")
            try:
                self._layer_patterns.append((regex, parse_pattern(rule["pattern"])))
            except ValueError as e:
                raise ValueError(f"sparsity.layer_patterns[{i}].pattern: {e}") from None
        check_backend_name(self.backend)
        if self.mask_change_freq < 0:
            raise ValueError(f"sparsity.mask_change_freq must be >= 0 (0 = never), got {self.mask_change_freq}")
        if self.dense_warmup_steps < 0:
            raise ValueError(f"sparsity.dense_warmup_steps must be >= 0, got {self.dense_warmup_steps}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"sparsity.total_steps must be >= 1, got {self.total_steps}")
        if isinstance(self.adapters, dict):
            _check_keys("sparsity.adapters", self.adapters, [f.name for f in fields(AdapterConfig)])
            self.adapters = AdapterConfig(**self.adapters)

    @classmethod
    def from_dict(cls, section: dict[str, Any] | "SparsityConfig" | None) -> "SparsityConfig":
        """Validate a ``"sparsity"`` dict; unknown or misspelt keys are errors."""
        if isinstance(section, SparsityConfig):
            return section
        section = dict(section or {})
        _check_keys("sparsity", section, [f.name for f in fields(cls)])
        return cls(**section)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` is asked to become sparse."""
        return any(p.search(name) for p in self._include) and not any(p.search(name) for p in self._exclude)

    def pattern_for(self, name: str) -> tuple[int, int]:
        """The N:M of the module called ``name``: the first matching ``layer_patterns`` rule, else ``pattern``."""
        for regex, nm_pattern in self._layer_patterns:
            if regex.search(name):
                return nm_pattern
        return parse_pattern(self.pattern)

    def adapter_start_step(self) -> int | None:
        """The optimizer step at which the adapters start training (None: no adapters)."""
        if self.adapters is None:
            return None
        if self.adapters.start_step is not None:
            return self.adapters.start_step
        if self.total_steps is None:
            raise ValueError("sparsity.adapters needs sparsity.total_steps (or adapters.start_step) to know "
                             "when the last part of training begins")
        return int(round(self.adapters.start * self.total_steps))


@dataclass
class FusionConfig:
    """Fused Triton kernels for the model's elementwise blocks (:func:`dsparse.nn.fuse_model`), dense or sparse.

    ``enabled``: ``"auto"`` fuses on CUDA (on CPU the kernels would run through the Triton
    interpreter), ``true`` everywhere, ``false`` never. ``rms_norm``, ``swiglu``, ``rope``: which
    blocks; ``min_rows``: inputs of fewer rows run HF's torch code. ``projections``: q/k/v and
    gate/up run as one GEMM each way (:func:`dsparse.nn.fuse_projections`; not under ZeRO-3).
    ``swiglu_mvue``: with MVUE weight gradients, the fused SwiGLU's backward also writes gate/up's
    compressed ``S(dYᵀ)`` (:func:`kernels.mvue_compress_swiglu`); false: a pass of its own reads ``dY``.
    """

    enabled: bool | str = "auto"
    rms_norm: bool = True
    swiglu: bool = True
    rope: bool = True
    projections: bool = True
    swiglu_mvue: bool = True
    # fewer rows (tokens; positions for RoPE) run HF's torch code: a decode step's few rows gain nothing
    # from one fused kernel and pay its launch
    min_rows: int = 256

    def __post_init__(self) -> None:
        if self.enabled != "auto":
            _check_bool("fusion.enabled", self.enabled, 'true, false or "auto"')
        _check_bool("fusion.rms_norm", self.rms_norm)
        _check_bool("fusion.swiglu", self.swiglu)
        _check_bool("fusion.rope", self.rope)
        _check_bool("fusion.projections", self.projections)
        _check_bool("fusion.swiglu_mvue", self.swiglu_mvue)
        if isinstance(self.min_rows, bool) or not isinstance(self.min_rows, int) or self.min_rows < 0:
            raise ValueError(f"fusion.min_rows must be an integer >= 0 (rows below it run HF's torch code), "
                             f"got {self.min_rows!r}")

    @classmethod
    def from_dict(cls, section: dict[str, Any] | None) -> "FusionConfig":
        """Validate a ``"fusion"`` dict; unknown or misspelt keys are errors."""
        section = dict(section or {})
        _check_keys("fusion", section, [f.name for f in fields(cls)])
        return cls(**section)

    def active(self, on_cuda: bool) -> bool:
        """Whether to fuse, for a run on CUDA (``on_cuda``) or not."""
        return on_cuda if self.enabled == "auto" else bool(self.enabled)


class _Switches:
    """A config section of true/false switches (a dataclass of bools) named ``SECTION``."""

    SECTION: ClassVar[str]

    @classmethod
    def from_dict(cls, section: dict[str, Any] | None):
        """Validate the section's dict; unknown or misspelt keys and non-bool values are errors."""
        section = dict(section or {})
        _check_keys(cls.SECTION, section, [f.name for f in fields(cls)])
        for key, value in section.items():
            _check_bool(f"{cls.SECTION}.{key}", value)
        return cls(**section)


@dataclass
class AutogradConfig(_Switches):
    """How the engine runs backward passes.

    ``multithreading`` (torch's default, true) hands the backward's CUDA work to autograd's
    device thread. The hand-offs cost host time that small layers cannot hide: one 4096²
    bf16 layer's forward + backward at 64 tokens takes 326 µs of host time threaded and
    283 µs on the calling thread for SparseLinear (211 and 130 µs for nn.Linear) on an
    H100 (``bench/results/overhead_h100.json``; 752 and 304 µs on an earlier instance and code). A DeepSpeed rank drives one GPU, so there is
    nothing to run in parallel: dsparse runs backward on the calling thread unless this is true.
    """

    SECTION: ClassVar[str] = "autograd"
    multithreading: bool = False


@dataclass
class StepConfig(_Switches):
    """How the engine's optimizer step meets the host.

    DeepSpeed's ZeRO-1/2 step reads its inf/NaN verdict and its clipping norm on the host,
    two device syncs per step: the GPU idles while the host issues the optimizer and the next
    forward. With ``sync_free`` (bf16, ZeRO-1/2, a torch fused Adam/AdamW, no offload) the
    clipping stays on the device, and a step with inf/NaN gradients is skipped by the fused
    optimizer kernel itself (torch's ``found_inf``, as ``GradScaler`` uses it); the host learns
    of a skip one step later, logs it and counts it in ``engine.device_skipped_steps``. The
    parameters and optimizer state are exactly those of DeepSpeed's host-checked skip; what
    differs is that the LR scheduler and the sparse schedule still advance on the skipped step.
    Other setups keep DeepSpeed's host check.
    """

    SECTION: ClassVar[str] = "step"
    sync_free: bool = True
