"""The CPU path of the LCKV backend: vLLM's own C++ paged-attention kernels (`torch.ops._C`), made strict.

Why: on CPU the plugin must serve as fast as vLLM's own Llama, and vLLM's CPU_ATTN kernels are SIMD code that reads
pages in place, where the portable torch path (`torch_path.py`) gathers every sequence's pages and calls SDPA (about
0.7 ms more per layer and step at batch 16).  These kernels know only inclusive-causal attention, so:

* strict attention ("the query at position t sees keys < t", docs/semantics.md) is the same kernel run with
  `seq_lens - 1`: it aligns a sequence's queries to the end of its visible keys (bottom-right), so query t sees
  keys <= t - 1.  A strict sliding window w (keys t-w+1 ... t-1) is the kernel's window w - 1 on the shortened
  sequence.  A query at position 0 sees no key and its output is exactly 0 by definition; such rows (only in steps
  where a prompt starts) are kept out of the kernel call and zeroed (see `_CpuState`).
* the pages are in the kernel's own format: blocks head-major (vLLM's LBHNC layout) and K stored transposed inside
  a block in an ISA-dependent way.  Only the kernel's write op can fill them and only its attention op can read
  them, so an engine uses this path for all of its layers or for none; `LCKVCpuAttentionBackend` declares the
  layout.  Zero-filling a producer's slots (iterative prefill) is a write of zeros through the same op.

Checked against the float64 reference in `tests/test_cpu_attention.py` (strict and causal, windows, GQA, block
sizes 16/32/128, positions 0, one-token prompts).  The kernels themselves are vLLM internals, reached only through
`cpu_kernels.py`.
"""

from __future__ import annotations

import torch

from . import cpu_kernels as ck
from .backend import CPU_BLOCK_SIZE_MULTIPLE
from .base import UNIT_SCALES, AttentionPath
from .page_dtype import AUTO, PageDtype
from .step import LCKVStep

# Head sizes vLLM 0.32's CPU attention kernels are compiled for (CPUAttentionBackend.get_supported_head_sizes).
SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_SIZE_MULTIPLE = CPU_BLOCK_SIZE_MULTIPLE  # the page format's block constraint, declared by the backend


def unsupported_reason(head_size: int, dtype: torch.dtype | None = None, block_size: int | None = None,
                       page_dtype: PageDtype = AUTO) -> str | None:
    """Why these kernels cannot serve a layer (None when they can)."""
    if page_dtype.quantized and ck.unavailable_reason() is None:
        try:  # vLLM's fp8 CPU kernels exist for AVX-512 / AMX and head sizes divisible by 32 only
            ck.attention_isa(dtype or torch.float32, block_size or BLOCK_SIZE_MULTIPLE * 2, head_size, page_dtype.name)
        except NotImplementedError as e:
            return f"{page_dtype.name} pages on this CPU ({e})"
    if head_size not in SUPPORTED_HEAD_SIZES:
        return f"head size {head_size} (vLLM's CPU kernels support {list(SUPPORTED_HEAD_SIZES)})"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype}"
    if block_size is not None and block_size % BLOCK_SIZE_MULTIPLE:
        return f"block size {block_size} (vLLM's CPU kernels need a multiple of {BLOCK_SIZE_MULTIPLE})"
    return ck.unavailable_reason()


def _split(kv_cache: torch.Tensor):
    """K and V page views `[num_blocks, num_kv_heads, block_size, head_size]` of one layer's cache, as vLLM's CPU
    backend makes them (each head's block holds block_size K rows, then block_size V rows)."""
    nb, hk, bs, two_d = kv_cache.shape
    return kv_cache.view(nb, hk, bs * 2, two_d // 2).chunk(2, dim=2)


class _CpuState:
    """What the kernels need per step beyond the step itself: the packed query layout of the strict call (rows at
    position 0 left out) and the kernels' scheduler metadata per (strict, window, shape).  Kept on the step."""

    def __init__(self, step: LCKVStep):
        # Strict rows at position 0 see no key.  They are also left out of the kernel call: with seq_lens - 1 such a
        # sequence would have one query more than keys, which the kernels do not expect (measured: NaN in other
        # rows of the sequence for some GQA shapes).  So the strict call gets the other rows, packed, with
        # query_start_loc shortened to match; decode-only steps (the common case) have no such rows.
        self.position0_rows = None
        self.strict_rows = None  # None: the strict call takes every row as is
        self.strict_query_start_loc = step.query_start_loc
        if step.any_starts_at_zero:
            device = step.query_start_loc.device
            qsl, at_zero = step.query_start_loc_cpu, step.starts_at_zero
            first = qsl[:-1][at_zero]
            self.position0_rows = first.to(device)
            keep = torch.ones(int(qsl[-1]), dtype=torch.bool)
            keep[first] = False
            self.strict_rows = keep.nonzero().flatten().to(device)
            strict_qsl = torch.zeros(step.num_reqs + 1, dtype=torch.int32)
            strict_qsl[1:] = (step.query_lens_cpu - at_zero.long()).cumsum(0)
            self.strict_query_start_loc = strict_qsl.to(device)
        self.scheduler: dict = {}

    def scheduler_metadata(self, step: LCKVStep, strict: bool, window: int, num_heads: int, num_kv_heads: int,
                           head_size: int, dtype: torch.dtype, isa: str):
        key = (strict, window, num_heads, num_kv_heads, head_size, dtype, isa)
        meta = self.scheduler.get(key)
        if meta is None:
            meta = self.scheduler[key] = ck.attention_schedule(
                num_reqs=step.num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
                seq_lens=step.strict_seq_lens if strict else step.seq_lens, dtype=dtype,
                query_start_loc=self.strict_query_start_loc if strict else step.query_start_loc,
                sliding_window_size=window, isa=isa,
            )
        return meta


def _state(step: LCKVStep) -> _CpuState:
    if step.cpu_state is None:
        step.cpu_state = _CpuState(step)
    return step.cpu_state


class CpuPath(AttentionPath):
    name = "cpu"
    page_format = "cpu"
    rounding = "toward_zero"  # vLLM's CPU kernels' fp8 write (measured, page_dtype.py)

    def __init__(self, page_dtype: PageDtype = AUTO, dtype: torch.dtype = torch.float32):
        super().__init__(page_dtype)
        self.dtype = dtype  # the model's: fp8 pages have no float dtype to write zeros in, and it picks the kernel

    def write_kv(self, key, value, kv_cache, slot_mapping, step=None, scales=UNIT_SCALES) -> None:
        k_cache, v_cache = _split(kv_cache)
        isa = ck.attention_isa(key.dtype, kv_cache.shape[2], key.shape[-1], self.page_dtype.name)
        ck.write_kv(key, value, k_cache, v_cache, slot_mapping, isa, *scales, kv_cache_dtype=self.page_dtype.name)

    def zero_slots(self, kv_cache, step) -> None:
        """A write of zeros through the kernels' own write op (only it knows the page format)."""
        _, hk, _, two_d = kv_cache.shape
        zeros = torch.zeros(step.slot_mapping.shape[0], hk, two_d // 2, dtype=self.dtype, device=kv_cache.device)
        self.write_kv(zeros, zeros, kv_cache, step.slot_mapping)

    def attend(self, q, kv_cache, step, *, scale, strict, window, out, scales=UNIT_SCALES):
        T, hq, d = q.shape
        if strict and window is not None and window <= 1:
            return out.zero_()  # a strict window of one position shows no key at all
        st = _state(step)
        kernel_window = -1 if window is None else (window - 1 if strict else window)
        k_cache, v_cache = _split(kv_cache)
        isa = ck.attention_isa(q.dtype, kv_cache.shape[2], d, self.page_dtype.name)
        meta = st.scheduler_metadata(step, strict, kernel_window, hq, kv_cache.shape[1], d, q.dtype, isa)
        packed = strict and st.strict_rows is not None
        if packed:
            if st.strict_rows.numel() == 0:
                return out.zero_()  # only one-token prompts: nothing to see
            q_in, o = q.index_select(0, st.strict_rows), q.new_empty(st.strict_rows.numel(), hq, d)
        else:
            q_in, o = q, out
        ck.attention(
            query=q_in, key_cache=k_cache, value_cache=v_cache, output=o,
            query_start_loc=st.strict_query_start_loc if strict else step.query_start_loc,
            seq_lens=step.strict_seq_lens if strict else step.seq_lens, scale=scale,
            sliding_window=kernel_window, block_table=step.block_table, scheduler_metadata=meta, k_scale=scales[0],
            v_scale=scales[1], kv_cache_dtype=self.page_dtype.name,
        )
        if packed:
            out.index_copy_(0, st.strict_rows, o)
            out.index_fill_(0, st.position0_rows, 0.0)
        return out

    def attend_streaming(self, q, kv_cache, step, *, scale, strict, out, read, scales=UNIT_SCALES):
        # the chooser never gives a streaming engine this path: rotating stored keys needs the plain page format
        raise NotImplementedError("StreamingLLM reads need the plain page format (torch or Triton path)")
