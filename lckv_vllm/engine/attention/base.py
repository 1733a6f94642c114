"""`AttentionPath`: the one small interface every attention implementation of the plugin implements.

A path owns a page format (`page_format`, which `backend.BACKENDS` maps to the vLLM backend class that declares it)
and the operations a layer needs on it: `write_kv` (store this step's K/V of a producer), `zero_slots` (the zero
start of an iterative prefill), `attend` (read the pages of the layer a layer attends to, writing into the caller's
`out`) and `attend_streaming` (the same in StreamingLLM mode: sinks + window, keys rotated when read).  One path is
chosen per engine at start-up (`chooser.py`) and handed to every layer: the page format is engine-wide, and no step
re-decides.  This module imports no path; only the chooser knows them all.

Paths: `torch_path.TorchPath` (portable gather + SDPA), `cpu_path.CpuPath` (vLLM's C++ kernels made strict),
`triton_path.TritonPath` (the Triton kernels in `lckv_vllm.kernels`).

What a page stores is the path's `page_dtype` (`page_dtype.py`: the model's dtype, or fp8 with per-producer scales),
engine-wide like the format.  `scales` = (k_scale, v_scale) of the producer whose pages are written or read: only
producers own pages, so only producers own scales, and a consumer reads with its producer's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .page_dtype import AUTO, PageDtype
from .step import LCKVStep

Scales = tuple[float, float]  # (k_scale, v_scale) of one producer; (1.0, 1.0) unless its checkpoint has scales
UNIT_SCALES: Scales = (1.0, 1.0)


class AttentionPath(ABC):
    name: str  # "torch" | "cpu" | "triton": what logs, metrics and tests report
    page_format: str = "plain"  # "plain" (token-major slots, `slot_view`) | "cpu" (vLLM's CPU kernels' own format)
    rounding: str = "nearest"  # how this path's fp8 writes round (page_dtype.py)

    def __init__(self, page_dtype: PageDtype = AUTO):
        if page_dtype.quantized and page_dtype.rounding != self.rounding:
            page_dtype = PageDtype(page_dtype.name, self.rounding)
        self.page_dtype = page_dtype

    @abstractmethod
    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 step: LCKVStep | None = None, scales: Scales = UNIT_SCALES) -> None:
        """Store `key`/`value` `[num_tokens, num_kv_heads, head_size]` at `slot_mapping` (−1 = padding, skipped).
        `step`, when given, learns that pages changed (paths that cache reads across layers need it)."""

    @abstractmethod
    def zero_slots(self, kv_cache: torch.Tensor, step: LCKVStep) -> None:
        """Zero the K/V of the step's tokens: the starting point of an iterative prefill."""

    @abstractmethod
    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, step: LCKVStep, *, scale: float, strict: bool,
               window: int | None, out: torch.Tensor, scales: Scales = UNIT_SCALES) -> torch.Tensor:
        """Attention of the step's queries `[num_tokens, num_heads, head_size]` over `kv_cache`'s pages into `out`.

        `strict`: the query at position t sees keys < t (a query with no visible key outputs exactly 0); else <= t.
        `window`: only positions t-window+1 ... t are visible (minus t itself when strict).  Returns `out`.
        """

    @abstractmethod
    def attend_streaming(self, q: torch.Tensor, kv_cache: torch.Tensor, step: LCKVStep, *, scale: float,
                         strict: bool, out: torch.Tensor, read, scales: Scales = UNIT_SCALES) -> torch.Tensor:
        """StreamingLLM attention (`read`: the engine's `streaming_read.StreamingRead`: sinks, window, RoPE) over
        pages of unrotated keys into `out`.  Returns `out`."""

    def round_trip(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """What a read sees of a value this path wrote (the K/V a prefill pass measures convergence on)."""
        return self.page_dtype.round_trip(x, scale)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.page_dtype.name}>"


def slot_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """Plain pages as `[num_slots, num_kv_heads, 2 * head_size]` (K in the first half, V in the second).

    vLLM hands each layer a logical `[num_blocks, num_kv_heads, block_size, 2 * head_size]` view whose physical order
    is LBNHC (the layout `LCKVAttentionBackend` asks for), i.e. token-major; transposing back gives a contiguous
    tensor.  Shared by the torch and Triton paths, which use the same plain page format.
    """
    if kv_cache.dim() == 3:
        return kv_cache
    nb, h, bs, c = kv_cache.shape
    phys = kv_cache.transpose(1, 2)
    assert phys.is_contiguous(), "LCKV KV pages must be token-major (LBNHC layout)"
    return phys.reshape(nb * bs, h, c)
