"""Refresh every sparse layer's GEMM operands right after an optimizer step, in one go.

Each layer's operands belong to its :class:`~dsparse.nn.sparse_product.SparseProduct`: the layer
itself, or the projection group it runs in (refreshed once for all its layers).

A layer's refresh is one Triton launch that rewrites the values regions of its compressed
``W`` and ``W̃ᵀ`` in place. Done lazily in the forward, ~150 of them (a 1B LLaMA) cost
~0.1 ms of host time each and left the GPU waiting on the host through the forward. On
CUDA the in-place refreshes of all layers are captured once into a CUDA graph and replayed
with one host call for as long as every address they touch stays the same; a layer whose
mask changed, or whose refresh reallocates, refreshes eagerly instead (and the graph is
captured anew once the set of addresses changes). Off CUDA each layer refreshes eagerly: the same kernels and
results, only earlier than the forward.
"""
from __future__ import annotations

import torch

from .sparse_linear import SparseLinear
from .sparse_product import SparseProduct


class OperandRefresh:
    """Call after each applied optimizer step (and after anything that changed the values)."""

    def __init__(self, layers: list[SparseLinear]) -> None:
        self.layers = layers
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None
        self.replays = 0  # steps refreshed by a graph replay (for tests and benchmarks)

    @torch.no_grad()
    def __call__(self) -> None:
        owners = {id(owner): owner for owner in (layer.operand_owner() for layer in self.layers)}
        layers = [owner for owner in owners.values() if owner.refreshes_operands]
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        keys = [layer.in_place_refresh_key() if layer.operands_on_cuda and not capturing else None
                for layer in layers]
        for layer, key in zip(layers, keys):
            if key is None:  # off CUDA, a changed mask, or a refresh that reallocates
                layer.refresh_operands()
        graphed = [(layer, key) for layer, key in zip(layers, keys) if key is not None]
        key = tuple((id(layer), key) for layer, key in graphed)
        if not graphed:
            self._graph = self._key = None
        elif key != self._key:
            self._capture([layer for layer, _ in graphed])
            self._key = key
        else:
            self._graph.replay()
            self.replays += 1
            for layer, _ in graphed:
                layer.mark_operands_current()

    def _capture(self, layers: list[SparseProduct]) -> None:
        """This step's refresh eagerly (it also compiles the kernels), then the same launches captured."""
        for layer in layers:
            layer.refresh_operands()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # torch.cuda.graph would also empty the allocator's cache
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                for layer in layers:
                    layer.refresh_cached_operands()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = graph
