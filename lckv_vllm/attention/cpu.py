"""The CPU path of the LCKV backend: vLLM's own C++ paged-attention kernels (`torch.ops._C`), made strict.

Why: on CPU the plugin must serve as fast as vLLM's own Llama, and vLLM's CPU_ATTN kernels are SIMD code that reads
pages in place, where the portable torch path (`impl.py`) gathers every sequence's pages and calls SDPA (about
0.7 ms more per layer and step at batch 16).  These kernels know only inclusive-causal attention, so:

* strict attention ("the query at position t sees keys < t", DESIGN.md §1) is the same kernel run with
  `seq_lens - 1`: it aligns a sequence's queries to the end of its visible keys (bottom-right), so query t sees
  keys <= t - 1.  A strict sliding window w (keys t-w+1 ... t-1) is the kernel's window w - 1 on the shortened
  sequence.  A query at position 0 sees no key and its output is exactly 0 by definition; such rows (only in steps
  where a prompt starts) are kept out of the kernel call and zeroed (see `_Step`).
* the pages are in the kernel's own format: blocks head-major (vLLM's LBHNC layout) and K stored transposed inside
  a block in an ISA-dependent way.  Only the kernel's write op can fill them and only its attention op can read
  them, so an engine uses this path for all of its layers or for none; `LCKVCpuAttentionBackend` declares the
  layout.  Zero-filling a producer's slots (iterative prefill) is a write of zeros through the same op.

Checked against the float64 reference in `tests/test_cpu_attention.py` (strict and causal, windows, GQA, block
sizes 16/32/128, positions 0, one-token prompts).
"""

from __future__ import annotations

import functools

import torch

# Head sizes vLLM 0.32's CPU attention kernels are compiled for (CPUAttentionBackend.get_supported_head_sizes).
SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_SIZE_MULTIPLE = 16  # the kernels check it (vec16 variant: 16, others 32); vLLM's CPU_ATTN asks for 32


def unsupported_reason(head_size: int, dtype: torch.dtype | None = None, block_size: int | None = None) -> str | None:
    """Why these kernels cannot serve a layer (None when they can)."""
    if head_size not in SUPPORTED_HEAD_SIZES:
        return f"head size {head_size} (vLLM's CPU kernels support {list(SUPPORTED_HEAD_SIZES)})"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype}"
    if block_size is not None and block_size % BLOCK_SIZE_MULTIPLE:
        return f"block size {block_size} (vLLM's CPU kernels need a multiple of {BLOCK_SIZE_MULTIPLE})"
    try:
        import vllm._custom_ops  # noqa: F401 - loads torch.ops._C

        torch.ops._C.cpu_attention_with_kv_cache  # noqa: B018 - present only in vLLM's CPU build
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"vLLM's CPU attention ops are not available ({type(e).__name__}: {e})"
    return None


@functools.lru_cache(maxsize=None)
def _isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The kernel variant vLLM's own CPU backend would pick for this shape (vec / vec16 / amx / neon ...)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, "auto")


def _split(kv_cache: torch.Tensor):
    """K and V page views `[num_blocks, num_kv_heads, block_size, head_size]` of one layer's cache, as vLLM's CPU
    backend makes them (each head's block holds block_size K rows, then block_size V rows)."""
    nb, hk, bs, two_d = kv_cache.shape
    return kv_cache.view(nb, hk, bs * 2, two_d // 2).chunk(2, dim=2)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store `key`/`value` `[num_tokens, num_kv_heads, head_size]` at `slot_mapping` (−1 = padding, skipped)."""
    from vllm import _custom_ops as ops

    k_cache, v_cache = _split(kv_cache)
    isa = _isa(key.dtype, kv_cache.shape[2], key.shape[-1])
    ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, isa)


def zero_slots(kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Zero the K/V of this step's tokens (the start of an iterative prefill), through the kernel's own write."""
    _, hk, _, two_d = kv_cache.shape
    zeros = kv_cache.new_zeros(slot_mapping.shape[0], hk, two_d // 2)
    write_kv(zeros, zeros, kv_cache, slot_mapping)


class _Step:
    """What every layer of a step needs beyond vLLM's metadata: the strict sequence lengths and query layout, and
    the kernels' scheduler metadata per (strict, window).  Built on first use, cached on the step's metadata."""

    def __init__(self, md):
        B = md.num_reqs
        self.B = B
        self.query_start_loc = md.query_start_loc[: B + 1]
        self.seq_lens = md.seq_lens[:B]
        self.block_table = md.block_table[:B]
        self.strict_seq_lens = self.seq_lens - 1
        qsl = (md.query_start_loc_cpu if md.query_start_loc_cpu is not None else md.query_start_loc)[: B + 1].cpu()
        sl = (md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens)[:B].cpu()
        q_lens = (qsl[1:] - qsl[:-1]).long()
        at_zero = sl.long() == q_lens  # the sequence's step starts at position 0 (a prompt with no context)
        device = md.query_start_loc.device
        # Strict rows at position 0 see no key.  They are also left out of the kernel call: with seq_lens - 1 such a
        # sequence would have one query more than keys, which the kernels do not expect (measured: NaN in other
        # rows of the sequence for some GQA shapes).  So the strict call gets the other rows, packed, with
        # query_start_loc shortened to match; decode-only steps (the common case) have no such rows.
        self.position0_rows = None
        self.strict_rows = None  # None: the strict call takes every row as is
        self.strict_query_start_loc = self.query_start_loc
        if bool(at_zero.any()):
            first = qsl[:-1].long()
            self.position0_rows = first[at_zero].to(device)
            keep = torch.ones(int(qsl[-1]), dtype=torch.bool)
            keep[first[at_zero]] = False
            self.strict_rows = keep.nonzero().flatten().to(device)
            strict_qsl = torch.zeros_like(qsl)
            strict_qsl[1:] = (q_lens - at_zero.long()).cumsum(0).to(qsl.dtype)
            self.strict_query_start_loc = strict_qsl.to(device)
        self.scheduler: dict = {}

    def scheduler_metadata(self, strict: bool, window: int, num_heads: int, num_kv_heads: int, head_size: int,
                           dtype: torch.dtype, isa: str):
        key = (strict, window, num_heads, num_kv_heads, head_size, dtype, isa)
        meta = self.scheduler.get(key)
        if meta is None:
            import vllm.envs as envs
            from vllm import _custom_ops as ops

            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=self.B, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
                seq_lens=self.strict_seq_lens if strict else self.seq_lens, dtype=dtype,
                query_start_loc=self.strict_query_start_loc if strict else self.query_start_loc, causal=True,
                sliding_window_size=window, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            )
            self.scheduler[key] = meta
        return meta


def _step(md) -> _Step:
    st = md.cache.get("cpu_step")
    if st is None:
        st = md.cache["cpu_step"] = _Step(md)
    return st


def attend(q: torch.Tensor, kv_cache: torch.Tensor, md, *, scale: float, strict: bool, window: int | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of this step's queries `[num_tokens, num_heads, head_size]` over `kv_cache`'s pages (see module
    docstring for how `strict` and `window` map onto the inclusive kernel).  Writes into `out` when given."""
    from vllm import _custom_ops as ops

    T, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    if strict and window is not None and window <= 1:
        return out.zero_()  # a strict window of one position shows no key at all
    st = _step(md)
    kernel_window = -1 if window is None else (window - 1 if strict else window)
    k_cache, v_cache = _split(kv_cache)
    isa = _isa(q.dtype, kv_cache.shape[2], d)
    meta = st.scheduler_metadata(strict, kernel_window, hq, kv_cache.shape[1], d, q.dtype, isa)
    packed = strict and st.strict_rows is not None
    if packed:
        if st.strict_rows.numel() == 0:
            return out.zero_()  # only one-token prompts: nothing to see
        q_in, o = q.index_select(0, st.strict_rows), q.new_empty(st.strict_rows.numel(), hq, d)
    else:
        q_in, o = q, out
    ops.cpu_attention_with_kv_cache(
        query=q_in, key_cache=k_cache, value_cache=v_cache, output=o,
        query_start_loc=st.strict_query_start_loc if strict else st.query_start_loc,
        seq_lens=st.strict_seq_lens if strict else st.seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=kernel_window, block_table=st.block_table, softcap=0.0, scheduler_metadata=meta, s_aux=None,
    )
    if packed:
        out.index_copy_(0, st.strict_rows, o)
        out.index_fill_(0, st.position0_rows, 0.0)
    return out
