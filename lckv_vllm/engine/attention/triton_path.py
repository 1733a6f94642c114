"""The Triton path: the kernels in `lckv_vllm.kernels` (the repository's `kernels/`) over plain slot pages.

On CUDA they compile natively.  Without CUDA they only run under Triton's interpreter (exact, very slow: for
testing), which Triton decides at decoration time, i.e. when a kernel module is imported: so `TRITON_INTERPRET=1`
must be set before that import, in every process that may import it.  `register()` calls
`use_interpreter_if_needed()` (vLLM runs it in every process it starts) and `_kernels()` repeats the check before the
lazy import.
"""

from __future__ import annotations

import os
import sys

import torch

from lckv_vllm.settings import attention_impl_choice
from .base import UNIT_SCALES, AttentionPath, slot_view
from .page_dtype import AUTO, PageDtype

_KERNEL_MODULES = ("lckv_vllm.kernels.kv_cache", "lckv_vllm.kernels.paged_attention")
_KERNELS = None


def _kernels_imported() -> bool:
    return any(m in sys.modules for m in _KERNEL_MODULES)


def use_interpreter_if_needed() -> None:
    """Set `TRITON_INTERPRET=1` when the Triton path is asked for (`LCKV_ATTENTION_IMPL=triton`) without a GPU.

    Only an explicit `triton` triggers it: `auto` never picks Triton on a machine without CUDA.
    """
    if attention_impl_choice() != "triton" or _kernels_imported():
        return  # not asked for, or too late to matter (changing it now would only mislead other Triton users)
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _kernels():
    """(kv_cache, paged_attention) kernel modules, imported on first use (importing Triton is slow)."""
    global _KERNELS
    if _KERNELS is None:
        if not _kernels_imported() and not torch.cuda.is_available():
            # The caller has chosen Triton whatever the environment says; without CUDA only the interpreter runs.
            os.environ["TRITON_INTERPRET"] = "1"
        from lckv_vllm.kernels import kv_cache, paged_attention

        _KERNELS = (kv_cache, paged_attention)
    return _KERNELS


def unsupported_reason(head_size: int, num_queries_per_kv: int, page_dtype: PageDtype = AUTO) -> str | None:
    """Why the kernels cannot serve a layer shape (None when they can).  Imports the kernels: a broken Triton
    install fails here, at start-up, not at the first request."""
    kernels = _kernels()[1]
    if head_size not in kernels.SUPPORTED_HEAD_SIZES:
        return f"head size {head_size} (supported: {kernels.SUPPORTED_HEAD_SIZES})"
    if num_queries_per_kv > kernels.MAX_QUERIES_PER_KV:
        return f"{num_queries_per_kv} query heads per KV head (supported: up to {kernels.MAX_QUERIES_PER_KV})"
    return None


class TritonPath(AttentionPath):
    name = "triton"

    def write_kv(self, key, value, kv_cache, slot_mapping, step=None, scales=UNIT_SCALES) -> None:
        _kernels()[0].write_kv(key, value, slot_view(kv_cache), slot_mapping, fp8=self._fp8, scales=scales)

    def zero_slots(self, kv_cache, step) -> None:
        _kernels()[0].zero_slots(slot_view(kv_cache), step.slot_mapping)

    def attend_streaming(self, q, kv_cache, step, *, scale, strict, out, read, scales=UNIT_SCALES):
        """The kernel walks each tile's sink range and window range and rotates in registers."""
        return self._paged(q, kv_cache, step, scale=scale, strict=strict, window=None, out=out,
                           streaming=(read.s.sink_tokens, read.s.window, read.theta), scales=scales)

    def attend(self, q, kv_cache, step, *, scale, strict, window, out, scales=UNIT_SCALES):
        return self._paged(q, kv_cache, step, scale=scale, strict=strict, window=window, out=out, streaming=None,
                           scales=scales)

    @property
    def _fp8(self) -> str | None:
        return self.page_dtype.name if self.page_dtype.quantized else None

    def _paged(self, q, kv_cache, step, *, scale, strict, window, out, streaming, scales):
        if kv_cache.dim() != 4:
            raise ValueError("the Triton path needs vLLM's 4-D page tensor (it reads the block size from it)")
        return _kernels()[1].paged_attention(
            q,
            slot_view(kv_cache),
            query_start_loc=step.query_start_loc,
            seq_lens=step.seq_lens,
            block_table=step.block_table,
            block_size=kv_cache.shape[2],
            scale=scale,
            strict=strict,
            window=window,
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            out=out,
            streaming=streaming,
            fp8=self._fp8,
            scales=scales,
        )
