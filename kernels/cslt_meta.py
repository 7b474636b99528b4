"""cuSPARSELt's compressed 2:4 operand for 16-bit types, written without cuSPARSELt.

``torch._cslt_compress`` of a ``(rows, cols)`` fp16/bf16 matrix, 2:4 along ``cols``, returns
``(rows, cols/2 + cols/16)`` elements: the kept values, row-major ``(rows, cols/2)`` (2 per
group of 4, in ascending position), then ``rows * cols / 8`` bytes of metadata, one nibble
per group: ``p0 | p1 << 2`` for kept positions ``p0 < p1``. Nibble ``n`` (low nibble first
in each byte) holds row ``r``, group ``g`` (columns ``4g .. 4g+3``) at

    n = (r // 64) * 16 * cols + (g // 8) * 512 + (r // 16 % 4) * 128 + (r % 8) * 16
        + (g % 4) * 4 + (g // 4 % 2) * 2 + (r // 8 % 2)

so each byte holds rows ``r`` and ``r + 8`` of one group. (A group of zeros may name any two
positions; ``torch._cslt_compress`` names 2 and 3.) Learnt on an H100 with cuSPARSELt
0.8.0 by compressing matrices whose groups' patterns spell out their own indices in binary,
for fp16 and bf16, and checked on random matrices (``tests/gpu``); the backend checks it
once per process and dtype before it writes operands this way. Other shapes are padded by
cuSPARSELt and not described here: both dims must be multiples of :data:`ALIGN`.
"""
from __future__ import annotations

import torch

__all__ = ["ALIGN", "compress_reference", "decompress_reference", "metadata_nibbles", "check_shape"]

ALIGN = 64  # rows and columns of a matrix whose compressed form has no padding


def check_shape(what: str, rows: int, cols: int) -> None:
    """Raise unless a ``(rows, cols)`` operand compresses without padding."""
    if rows % ALIGN or cols % ALIGN:
        raise ValueError(f"{what}: a ({rows}, {cols}) operand is padded by cuSPARSELt; both dims must be "
                         f"multiples of {ALIGN} to be written directly (pad the matrix first)")


def metadata_nibbles(rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(rows, cols/4)`` int64: the metadata nibble that holds each group of 4."""
    check_shape("metadata_nibbles", rows, cols)
    r = torch.arange(rows, device=device)[:, None]
    g = torch.arange(cols // 4, device=device)[None, :]
    return ((r // 64) * 16 * cols + (g // 8) * 512 + (r // 16 % 4) * 128 + (r % 8) * 16
            + (g % 4) * 4 + (g // 4 % 2) * 2 + (r // 8 % 2))


def compress_reference(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The compressed operand (as ``torch._cslt_compress`` lays it out) of the 2:4 matrix keeping
    ``values`` ``(rows, cols/2)`` (fp16/bf16) at ``positions`` (``(rows, cols/2)``, 0..3, ascending
    within each group of 4)."""
    if values.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"compress_reference: values must be fp16 or bf16, got {values.dtype}")
    rows, kept = values.shape
    check_shape("compress_reference", rows, 2 * kept)
    pos = positions.to(torch.int64).reshape(rows, kept // 2, 2)
    nibbles = torch.zeros(rows * kept // 2, dtype=torch.int64, device=values.device)
    nibbles[metadata_nibbles(rows, 2 * kept, values.device).reshape(-1)] = (pos[..., 0] | pos[..., 1] << 2).reshape(-1)
    meta = (nibbles[0::2] | nibbles[1::2] << 4).to(torch.uint8)
    packed = torch.cat([values.contiguous().view(torch.uint8).reshape(-1), meta])
    return packed.view(values.dtype).reshape(rows, kept + kept // 8)


def decompress_reference(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The dense ``(rows, cols)`` 2:4 matrix whose compressed form is ``packed`` (inverse of
    :func:`compress_reference`; a group of zeros decodes to zeros wherever its metadata points)."""
    rows = packed.shape[0]
    check_shape("decompress_reference", rows, cols)
    flat = packed.reshape(-1)
    values = flat[: rows * cols // 2].view(rows, cols // 2)
    meta = flat[rows * cols // 2:].view(torch.uint8).to(torch.int64)
    nibbles = torch.stack([meta & 15, meta >> 4], 1).reshape(-1)[metadata_nibbles(rows, cols, packed.device)]
    positions = torch.stack([nibbles & 3, nibbles >> 2], -1).reshape(rows, cols // 4, 2)
    dense = torch.zeros(rows, cols // 4, 4, dtype=packed.dtype, device=packed.device)
    return dense.scatter_(-1, positions, values.reshape(rows, cols // 4, 2)).reshape(rows, cols)
