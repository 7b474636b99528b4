"""Inputs for the kernel tests and benchmarks: 2:4 weights in dsparse's kept-values form."""
from __future__ import annotations

import torch

__all__ = ["random_kept", "random_keep_t", "compressed_operand", "bits"]


def _positions_2_4(scores: torch.Tensor) -> torch.Tensor:
    """Ascending positions (uint8) of the 2 largest of every 4 along the last dim (stable)."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // 4, 4)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    return torch.sort(top, dim=-1).values.to(torch.uint8).reshape(rows, cols // 2)


def random_kept(out_features: int, in_features: int, dtype: torch.dtype = torch.float32, device="cpu",
                mode: str = "randn", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, idx)`` of a random 2:4 weight.

    ``mode``: ``"randn"`` (magnitude mask of a Gaussian weight), ``"ties"`` (values rounded
    to 0.5, a third exact zeros, many equal magnitudes; mask drawn independently of the
    values), ``"random_mask"`` (Gaussian values, mask independent of them), ``"zeros"``.
    """
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(out_features, in_features, generator=gen)
    if mode == "randn":
        idx = _positions_2_4(dense.abs())
    elif mode in ("ties", "random_mask", "zeros"):
        idx = _positions_2_4(torch.rand(out_features, in_features, generator=gen))
        if mode == "ties":
            dense = (dense * 2).round() / 2
            dense[torch.rand(out_features, in_features, generator=gen) < 1 / 3] = 0.0
        elif mode == "zeros":
            dense.zero_()
    else:
        raise ValueError(f"unknown mode {mode!r}")
    groups = dense.reshape(out_features, in_features // 4, 4)
    values = torch.gather(groups, -1, idx.long().reshape(out_features, in_features // 4, 2))
    values = values.reshape(out_features, in_features // 2).to(dtype)
    return values.to(device), idx.to(device)


def random_keep_t(out_features: int, in_features: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """An arbitrary bool ``keep_t`` ``(out, in/2)``, independent of any values."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(out_features, in_features // 2, generator=gen) < 0.5).to(device)


def compressed_operand(rows: int, cols: int, dtype: torch.dtype, device="cpu", mode: str = "randn",
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, dense)``: a random 2:4 ``(rows, cols)`` weight (:func:`random_kept`'s ``mode``) compressed
    as cuSPARSELt lays it out (:mod:`kernels.cslt_meta`), and the dense matrix it holds."""
    from dsparse import nm

    from .cslt_meta import compress_reference

    values, idx = random_kept(rows, cols, dtype, "cpu", mode, seed)
    return compress_reference(values, idx).to(device), nm.scatter_kept(values, idx, 2, 4).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for bit-exact comparisons (NaN and -0.0 included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])
