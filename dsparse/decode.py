"""Greedy decoding with a static KV cache, each step one CUDA graph replay.

A decoding step runs every product on one token per sequence: a few microseconds of GPU work
each, and on a slow host far more time issuing them (an eager llama-1b step on the H200's host:
~27 ms of host time for 2.3 ms of GPU work, dense or sparse). Serving stacks therefore capture
the step once and replay it. :class:`GraphDecoder` does that for any Hugging Face causal LM,
dense or exported by :mod:`dsparse.export` (whose frozen products, cuSPARSELt's and
:func:`kernels.skinny_sparse_mm`, are capturable): the cache is a ``transformers.StaticCache``,
whose write position is a device tensor that each replay advances, so the captured step needs
no host input. The prefill runs eagerly, as ``generate`` runs it.

A fused model (:func:`dsparse.fuse_model`) runs HF's torch code below ``fusion.min_rows`` rows,
because in an eager decoding step a Triton launch costs more host time than it saves. A replay
issues no launches, so the decoder runs the fused kernels from ``fused_rows`` rows on
(:func:`dsparse.nn.fused_from`): one RMSNorm kernel in place of seven torch ops, one RoPE
kernel per operand in place of the rotate-half's ten. Its eager steps do the same, so both
compute the same tokens.

On the CPU (or with ``graphs=False``) the same steps run eagerly: the tests check the tokens
against ``generate``'s there.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import StaticCache

from .nn.fused import fused_from

__all__ = ["GraphDecoder"]


class GraphDecoder:
    """Greedy continuation of ``(batch, prompt_len)`` prompts by ``new_tokens`` tokens, for one batch size
    and ``prompt_len + new_tokens <= max_len`` (the static cache's length).

    ``graphs=None`` captures the step on CUDA and runs it eagerly elsewhere. Capture happens on the
    first call (after two eager warm-up steps, which also tune any product plans the step needs and
    compile the kernels). ``fused_rows``: the row count from which fused modules run their kernels
    while the decoder runs the model (None: each module's own ``min_rows``).
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, graphs: bool | None = None,
                 fused_rows: int | None = 1) -> None:
        self.model, self.batch, self.max_len = model, batch, max_len
        self._fusion = fused_from(fused_rows) if fused_rows is not None else contextlib.nullcontext()
        device = next(model.parameters()).device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError(f"GraphDecoder: CUDA graphs need the model on a CUDA device, it is on {device}; "
                             "pass graphs=False to decode eagerly")
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's input and output
        self._graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def _prefill(self, prompt: torch.Tensor) -> None:
        self.cache.reset()
        logits = self.model(input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))

    @torch.no_grad()
    def _step(self) -> None:
        logits = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def _capture(self, prompt: torch.Tensor) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
            self._prefill(prompt)
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Prefill ``(batch, prompt_len)`` prompts (capturing the step first, on first use): the first new token
        of each sequence, ``(batch, 1)``; each :meth:`step` then gives the next. The returned tensor is the
        decoder's own, overwritten by the next step."""
        if prompt.shape[0] != self.batch or prompt.shape[1] >= self.max_len:
            raise ValueError(f"GraphDecoder: built for {self.batch} sequences of up to {self.max_len} tokens, got "
                             f"{prompt.shape[0]} prompts of {prompt.shape[1]} tokens (at least one new token must "
                             "fit); build another decoder for other sizes")
        with self._fusion:
            if self.graphs and self._graph is None:
                self._capture(prompt)
            self._prefill(prompt)
        return self.token

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """The next token of each sequence after :meth:`start` and the steps since, ``(batch, 1)`` (the decoder's
        own tensor): one graph replay where captured. The caller keeps within ``max_len``."""
        if self._graph is not None:
            self._graph.replay()
        else:
            with self._fusion:
                self._step()
        return self.token

    def __call__(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The ``(batch, new_tokens)`` greedy continuation of ``prompt``."""
        if prompt.shape[0] != self.batch or prompt.shape[1] + new_tokens > self.max_len or new_tokens < 1:
            raise ValueError(f"GraphDecoder: built for {self.batch} sequences of up to {self.max_len} tokens, got "
                             f"{prompt.shape[0]} prompts of {prompt.shape[1]} tokens and {new_tokens} new tokens "
                             "(new_tokens >= 1); build another decoder for other sizes")
        out = torch.empty(self.batch, new_tokens, dtype=torch.long, device=self.token.device)
        out[:, 0:1] = self.start(prompt)
        for i in range(1, new_tokens):
            out[:, i:i + 1] = self.step()
        return out
