"""Unified paged attention for cross-layer KV sharing: one Triton kernel for a mixed batch of prefill chunks and
decode tokens, with a split-KV path for long decode contexts.

What it computes (docs/semantics.md; reference: `reference.paged_attention_ref`): queries are packed varlen
(`query_start_loc`), query i of sequence s sits at absolute position t = seq_len - query_len + i and attends to the
keys of its sequence at positions p with
    p <= t            (ordinary causal)   or   p < t   (`strict`: a layer reading another layer's, not yet final, KV)
    p > t - window    (sliding window, optional)
A query that sees no key (position 0 under `strict`) outputs exactly 0.  GQA: query head h reads KV head
h // (num_heads // num_kv_heads).  K/V come from the slot layout `[num_slots, num_kv_heads, 2 * head_size]`
(K first half, V second half), slot = block_table[s, p // block_size] * block_size + p % block_size.

How it is tiled: a program owns BLOCK_Q query tokens of one sequence times all the query heads of one KV head (the
GQA group, padded to a power of two), so each K/V tile loaded from the pages serves the whole group.  The key range a
tile can see is computed up front (causal upper bound, window lower bound), and the program streams it in BLOCK_N
keys with an online softmax in fp32 (base 2).  For decode batches whose (sequence x KV head) programs cannot fill the
GPU, the key range is cut into NUM_SPLITS partitions handled by separate programs, each writing a normalised partial
output and its log-sum-exp; `_combine_splits_kernel` merges them.

Import this module only after `TRITON_INTERPRET` has its final value (on CPU it must be "1"); Triton itself may
have been imported earlier (see the note on `_MAX` below).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 128)
MAX_QUERIES_PER_KV = 8
LOG2E = 1.4426950408889634
# Triton's CPU interpreter multiplies bf16 operands as their raw uint16 storage in tl.dot (wrong results), so under
# the interpreter bf16 operands are rounded to bf16 as on the GPU and then handed to tl.dot as fp32: products of
# bf16 values are exact in fp32, so this reproduces the GPU's bf16 x bf16 -> fp32 numerics.  Decided once, like the
# interpret flag itself, at import.
_UPCAST_BF16_DOT = bool(triton.knobs.runtime.interpret)
# The kernels call only Triton builtins (tl.full, tl.reduce, ...), never tl.zeros / tl.max / tl.sum: those are
# themselves @triton.jit functions of Triton's standard library, decorated when Triton is imported.  vLLM imports
# Triton before a plugin can set TRITON_INTERPRET, so in a vLLM process they were prepared for compilation and an
# interpreted kernel cannot call them.  Reductions therefore go through the builtin tl.reduce with Triton's own
# combine functions, which the compiler inlines exactly like tl.max / tl.sum and the interpreter recognises and
# hands to numpy.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine
FP8_FORMATS = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 2}  # as kernels/kv_cache.py writes them


@triton.jit
def _fp8_decode(raw, MAN: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr):
    """An fp8 byte (MAN mantissa bits, exponent bias BIAS) -> its fp32 value, exactly, by building the float32 bits:
    Triton has no e4m3 type before sm_89 (kernels/test_cuda_compile.py compiles for sm_80), so no cast is used.
    Exponent 0 is the subnormal range, in units of the smallest subnormal 1 / SUB.  (NaN/inf codes are never
    written: kv_cache.py saturates.)"""
    b = raw.to(tl.int32)
    e = (b >> MAN) & ((1 << (7 - MAN)) - 1)
    m = b & ((1 << MAN) - 1)
    normal = (((e - BIAS + 127) << 23) | (m << (23 - MAN))).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, m.to(tl.float32) / SUB, normal)
    return tl.where((b & 0x80) != 0, -val, val)


@triton.jit
def _page_values(raw, scale, FP8: tl.constexpr):
    """Page elements -> values: fp8 bytes decoded and scaled (fp32), or the stored floats as they are."""
    if FP8 == 1:
        return _fp8_decode(raw, 3, 7, 512.0) * scale
    elif FP8 == 2:
        return _fp8_decode(raw, 2, 15, 65536.0) * scale
    else:
        return raw


@triton.jit
def _causal(kpos, pos, STRICT: tl.constexpr):
    """[rows, keys] mask of the keys each query may see by position: strictly earlier ones on a consumer layer of the
    cyclic segment (STRICT: its own KV is not computed yet), earlier or its own otherwise."""
    if STRICT:
        return kpos[None, :] < pos[:, None]
    else:
        return kpos[None, :] <= pos[:, None]


@triton.jit
def _softmax_tile(s, visible, m_i, l_i):
    """One key tile of the online softmax in base 2: scores `s` [rows, keys], the keys each row may see, the
    running max `m_i` and sum `l_i` -> (p, alpha, new max, new sum); the caller rescales its accumulator by alpha.
    A row with nothing visible so far keeps m = -inf; subtracting a finite stand-in keeps exp2 at 0 instead of
    exp2(-inf - -inf) = NaN, so such rows end with l = 0 (see _normalize)."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    return p, alpha, m_new, l_i * alpha + tl.reduce(p, 1, _SUM)


@triton.jit
def _tile_values(kv_base, slot, stride_slot, d, k_valid, d_valid, v_scale, HEAD_SIZE: tl.constexpr,
                 FP8: tl.constexpr):
    """The V half of a key tile's slots [keys, D], as values (fp8 pages decoded and scaled)."""
    v = tl.load(kv_base + slot[:, None] * stride_slot + HEAD_SIZE + d[None, :],
                mask=k_valid[:, None] & d_valid[None, :], other=0.0)
    return _page_values(v, v_scale, FP8)


@triton.jit
def _normalize(acc, l_i):
    """acc / l per row -> (output, has_key); a row that saw no key is exactly 0 (acc is 0 too: this documents it)."""
    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    return tl.where(has_key[:, None], o, 0.0), has_key


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, HEAD_SIZE], strides (stride_qt, stride_qh, 1)
    kv_ptr,  # [num_slots, num_kv_heads, 2 * HEAD_SIZE], strides (stride_slot, stride_kvh, 1); K | V
    out_ptr,  # NUM_SPLITS == 1: [num_tokens, num_heads, HEAD_SIZE] in q's dtype, strides (stride_ot, stride_oh, 1);
    #           NUM_SPLITS > 1: [NUM_SPLITS, num_tokens, num_heads, HEAD_SIZE] fp32, split stride stride_os
    lse_ptr,  # [NUM_SPLITS, num_tokens, num_heads] fp32, contiguous (log2-sum-exp2 of each partial; unused if 1 split)
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32, context + this step's query tokens
    block_table_ptr,  # [num_seqs, max_blocks] int32, row stride stride_bt
    num_seqs,
    num_tokens,
    num_heads,
    scale_log2,  # softmax scale * log2(e): scores are kept in base 2 so the kernel can use exp2
    window,  # sliding window (read only when USE_WINDOW)
    stride_qt,
    stride_qh,
    stride_slot,
    stride_kvh,
    stride_os,
    stride_ot,
    stride_oh,
    stride_bt,
    sinks,  # STREAMING: sink tokens S (positions < S stay visible)
    log2_theta,  # STREAMING: log2 of the RoPE base (keys and queries are rotated here, at their cache positions)
    k_scale,  # FP8: the producer's scales; a page element reads as fp8 * scale
    v_scale,
    NUM_Q_PER_KV: tl.constexpr,  # query heads per KV head (GQA group)
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_SIZE; padded lanes are masked to 0
    BLOCK_G: tl.constexpr,  # next power of two >= NUM_Q_PER_KV
    BLOCK_Q: tl.constexpr,  # query tokens per program; BLOCK_Q * BLOCK_G rows
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_SIZE: tl.constexpr,  # page (block) size in tokens
    STRICT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no TF32 rounding), "tf32" (= default) otherwise
    UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 copies of the (already rounded) operands; see _UPCAST_BF16_DOT
    STREAMING: tl.constexpr = False,  # StreamingLLM reads: sinks + `window`, unrotated pages rotated per tile
    FP8: tl.constexpr = 0,  # 0: pages in q's dtype family; 1 / 2: uint8 pages of fp8 e4m3fn / e5m2 (kv_cache.py)
):
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS

    # Which sequence does this query block belong to?  Sequence s owns the program ids
    # [query_start_loc[s] // BLOCK_Q + s, ... + cdiv(query_len, BLOCK_Q)); these starts are non-decreasing and the
    # launcher sizes the grid as num_tokens // BLOCK_Q + num_seqs, which covers every sequence without a host-side
    # scan of the query lengths.  Binary search for the last s whose start is <= q_block.
    lo_s = q_block * 0  # int32 tensors, not Python ints: they are loop-carried
    hi_s = lo_s + num_seqs
    while lo_s < hi_s - 1:
        mid = (lo_s + hi_s) // 2
        start_mid = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo_s = tl.where(start_mid <= q_block, mid, lo_s)
        hi_s = tl.where(start_mid <= q_block, hi_s, mid)
    seq = lo_s
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    tok0 = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query (index within the sequence) of the tile

    rows = tl.arange(0, BLOCK_M)
    qi = tok0 + rows // BLOCK_G  # query index within the sequence
    g = rows % BLOCK_G  # query head within the GQA group
    row_valid = (qi < q_len) & (g < NUM_Q_PER_KV)
    head = kv_head * NUM_Q_PER_KV + g
    pos = context + qi  # absolute position of each row's query
    token = (q_start + qi).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_SIZE

    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # Keys the tile can see: [lo, hi).  Upper bound from the tile's last query (causal), lower bound from its first
    # query (window).  An empty tile (tok0 >= q_len: the grid over-covers) gets an empty range and stores nothing.
    last_q = tl.minimum(q_len, tok0 + BLOCK_Q) - 1
    hi = context + last_q + 1
    if STRICT:
        hi -= 1
    if STREAMING:
        _streaming_tile(q, q_ptr, kv_ptr, out_ptr, token, head, pos, row_valid, d, d_valid, tok0, q_len, context,
                        seq_len, seq, kv_head, hi, sinks, window, log2_theta, scale_log2, block_table_ptr,
                        stride_qt, stride_qh, stride_slot, stride_kvh, stride_ot, stride_oh, stride_bt,
                        k_scale, v_scale, HEAD_SIZE, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_SIZE, STRICT, DOT_PRECISION,
                        FP8)
        return
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(context + tok0 - window + 1, 0)
    hi = tl.where(tok0 < q_len, hi, lo)
    hi = tl.maximum(hi, lo)
    if NUM_SPLITS > 1:
        # Whole BLOCK_N tiles per split so only the last tile of the range is ragged; trailing splits may be empty.
        n_tiles = (hi - lo + BLOCK_N - 1) // BLOCK_N
        per_split = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 scaled scores)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    kv_base = kv_ptr + kv_head.to(tl.int64) * stride_kvh
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_valid = kpos < hi
        block = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + kpos % BLOCK_SIZE
        # K is loaded transposed, [BLOCK_D, BLOCK_N], for q @ k.  Keys outside the range are never read: the
        # pages behind them may belong to other sequences or hold garbage, and 0 * NaN would poison the sums.
        k = tl.load(kv_base + slot[None, :] * stride_slot + d[:, None],
                    mask=k_valid[None, :] & d_valid[:, None], other=0.0)
        k = _page_values(k, k_scale, FP8)
        s = tl.dot(q, k.to(q_ptr.dtype.element_ty).to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        visible = _causal(kpos, pos, STRICT)
        if USE_WINDOW:
            visible &= kpos[None, :] > pos[:, None] - window
        visible &= k_valid[None, :]
        p, alpha, m_new, l_i = _softmax_tile(s, visible, m_i, l_i)
        v = _tile_values(kv_base, slot, stride_slot, d, k_valid, d_valid, v_scale, HEAD_SIZE, FP8)
        acc = acc * alpha[:, None]
        # P is rounded to the input dtype for the second product, as flash-attention kernels do on tensor cores.
        acc = tl.dot(p.to(q_ptr.dtype.element_ty).to(q.dtype), v.to(q_ptr.dtype.element_ty).to(q.dtype), acc, input_precision=DOT_PRECISION)
        m_i = m_new

    o, has_key = _normalize(acc, l_i)
    o_ptrs = out_ptr + split.to(tl.int64) * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        lse_ptrs = lse_ptr + (split.to(tl.int64) * num_tokens + token) * num_heads + head
        tl.store(lse_ptrs, lse, mask=row_valid)


@triton.jit
def _rotate(x, x_swapped, sign, angle):
    """Neox RoPE of rows/columns `x` at `angle` (same shape): x * cos + rotate_half(x) * sin, where
    rotate_half(x) = sign * x_swapped (the other half of the head, the first half negated)."""
    return x * tl.cos(angle) + sign * x_swapped * tl.sin(angle)


@triton.jit
def _streaming_tile(q, q_ptr, kv_ptr, out_ptr, token, head, pos, row_valid, d, d_valid, tok0, q_len, context,
                    seq_len, seq, kv_head, hi, sinks, window, log2_theta, scale_log2, block_table_ptr,
                    stride_qt, stride_qh, stride_slot, stride_kvh, stride_ot, stride_oh, stride_bt, k_scale, v_scale,
                    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, STRICT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    FP8: tl.constexpr):
    """StreamingLLM reads for one tile of queries (docs/semantics.md, section 5; torch twin:
    `lckv_vllm/engine/attention/streaming_read.py`).  The pages hold unrotated keys.  Two key ranges: the sinks
    [0, min(S, hi)) and the window [max(S, first query - W + 1), hi).  With span = S + W, a query at t is rotated at
    t - shift(t) against sinks (shift(t) = max(0, t - span + 1)) and at t - c against window keys, which are rotated
    at j - c, c = the sequence's last query's shift: window scores depend on t - j only.  Angles stay below
    span + the chunk, so fp32 keeps them exact enough however long the stream."""
    HALF: tl.constexpr = HEAD_SIZE // 2
    fi = (d % HALF).to(tl.float32)
    inv_freq = tl.exp2(-(2.0 * fi / HEAD_SIZE) * log2_theta)  # theta ** (-2 i / head_size), lane i of each half
    d_swap = tl.where(d < HALF, d + HALF, d - HALF)
    sign = tl.where(d < HALF, -1.0, 1.0)
    q_swap = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d_swap[None, :],
                     mask=row_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    span = sinks + window
    c = tl.maximum(seq_len - span, 0)
    shift = tl.maximum(pos - (span - 1), 0)
    q_sink = _rotate(qf, q_swap, sign[None, :], (pos - shift).to(tl.float32)[:, None] * inv_freq[None, :])
    q_win = _rotate(qf, q_swap, sign[None, :], (pos - c).to(tl.float32)[:, None] * inv_freq[None, :])
    q_sink = q_sink.to(q.dtype)
    q_win = q_win.to(q.dtype)

    sink_hi = tl.minimum(sinks, hi)
    win_lo = tl.maximum(sinks, context + tok0 - window + 1)
    n_sink = tl.where(tok0 < q_len, tl.maximum(sink_hi, 0) + BLOCK_N - 1, 0) // BLOCK_N
    n_win = tl.where(tok0 < q_len, tl.maximum(hi - win_lo, 0) + BLOCK_N - 1, 0) // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    kv_base = kv_ptr + kv_head.to(tl.int64) * stride_kvh
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    for it in range(0, n_sink + n_win):
        in_sink = it < n_sink
        start = tl.where(in_sink, it * BLOCK_N, win_lo + (it - n_sink) * BLOCK_N)
        end = tl.where(in_sink, sink_hi, hi)
        base = tl.where(in_sink, 0, c)
        kpos = start + tl.arange(0, BLOCK_N)
        k_valid = kpos < end
        block = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + kpos % BLOCK_SIZE
        kmask = k_valid[None, :] & d_valid[:, None]
        k = tl.load(kv_base + slot[None, :] * stride_slot + d[:, None], mask=kmask, other=0.0)
        k = _page_values(k, k_scale, FP8).to(tl.float32)
        k_swap = _page_values(tl.load(kv_base + slot[None, :] * stride_slot + d_swap[:, None], mask=kmask, other=0.0),
                              k_scale, FP8)
        k = _rotate(k, k_swap.to(tl.float32), sign[:, None], (kpos - base).to(tl.float32)[None, :] * inv_freq[:, None])
        q_use = tl.where(in_sink, q_sink, q_win)
        s = tl.dot(q_use, k.to(q_use.dtype), input_precision=DOT_PRECISION) * scale_log2
        visible = _causal(kpos, pos, STRICT)
        visible &= (kpos[None, :] < sinks) | (kpos[None, :] > pos[:, None] - window)
        visible &= k_valid[None, :]
        p, alpha, m_new, l_i = _softmax_tile(s, visible, m_i, l_i)
        v = _tile_values(kv_base, slot, stride_slot, d, k_valid, d_valid, v_scale, HEAD_SIZE, FP8)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(q_use.dtype), v.to(q_use.dtype), acc, input_precision=DOT_PRECISION)
        m_i = m_new
    o, _ = _normalize(acc, l_i)
    o_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _combine_splits_kernel(
    part_ptr,  # [NUM_SPLITS, num_tokens, num_heads, HEAD_SIZE] fp32, contiguous: normalised partial outputs
    lse_ptr,  # [NUM_SPLITS, num_tokens, num_heads] fp32, contiguous: base-2 log-sum-exp of each partial
    out_ptr,  # [num_tokens, num_heads, HEAD_SIZE], strides (stride_ot, stride_oh, 1)
    num_tokens,
    num_heads,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out = sum_s w_s * o_s / sum_s w_s with w_s = exp2(lse_s - max lse): the partials' softmax denominators,
    # rescaled to a common maximum.  Empty partitions have lse = -inf and weigh 0; all empty -> 0.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_valid = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_SIZE
    row = (s.to(tl.int64) * num_tokens + t) * num_heads + h
    lse = tl.load(lse_ptr + row, mask=s_valid, other=float("-inf"))
    m = tl.reduce(lse, 0, _MAX)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    denom = tl.reduce(w, 0, _SUM)
    part = tl.load(part_ptr + row[:, None] * HEAD_SIZE + d[None, :],
                   mask=(s_valid & (w > 0.0))[:, None] & d_valid[None, :], other=0.0)
    o = tl.reduce(w[:, None] * part, 0, _SUM) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_valid)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_num_splits(device: torch.device, num_seqs: int, num_kv_heads: int, max_query_len: int,
                        max_seq_len: int, block_n: int) -> int:
    """Split the key range only where it pays: single-tile (decode) batches whose programs leave SMs idle and whose
    context is long enough that each partition still streams several tiles."""
    if device.type != "cuda" or max_query_len > 1:
        return 1
    programs = num_seqs * num_kv_heads
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= 2 * sms:
        return 1
    by_occupancy = triton.cdiv(2 * sms, programs)
    by_length = max_seq_len // (4 * block_n)  # keep >= 4 key tiles per partition
    return int(max(1, min(by_occupancy, by_length, 64)))


def paged_attention(
    q: torch.Tensor,
    kv_slots: torch.Tensor,
    *,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    scale: float,
    strict: bool = False,
    window: int | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    streaming: tuple[int, int, float] | None = None,
    fp8: str | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Attention of packed queries `q` `[num_tokens, num_heads, head_size]` over the paged K/V in `kv_slots`
    `[num_slots, num_kv_heads, 2 * head_size]`.  Returns `out` `[num_tokens, num_heads, head_size]` (q's dtype).

    `query_start_loc` [num_seqs + 1], `seq_lens` [num_seqs], `block_table` [num_seqs, max_blocks] live on q's device.
    `max_query_len` / `max_seq_len` are host-side bounds (vLLM's metadata carries them); they only pick tile sizes
    and the split count, so passing None costs a device sync to compute them.  `num_splits` (None = heuristic) and
    `block_n` override the launch configuration, for tests and benchmarks.  `streaming` = (sink tokens, window, RoPE
    base): StreamingLLM reads over pages of unrotated keys (docs/semantics.md, section 5; `window` must be None).
    `fp8` ("fp8", "fp8_e4m3", "fp8_e5m2"): `kv_slots` is uint8 and holds fp8 values, read as fp8 * `scales` (k, v)
    (docs/semantics.md, section 6).
    """
    num_tokens, num_heads, head_size = q.shape
    num_kv_heads = kv_slots.shape[1]
    if kv_slots.dim() != 3 or kv_slots.shape[2] != 2 * head_size or kv_slots.stride(-1) != 1:
        raise ValueError(f"kv_slots {tuple(kv_slots.shape)} (strides {kv_slots.stride()}) is not a slot view "
                         f"[num_slots, num_kv_heads, 2 * {head_size}] with a contiguous last axis")
    fmt = FP8_FORMATS[fp8] if fp8 else 0
    if fmt and kv_slots.dtype != torch.uint8:
        raise ValueError(f"fp8 pages are uint8 tensors, got {kv_slots.dtype}")
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head_size {head_size} not supported by the Triton path (supported: {SUPPORTED_HEAD_SIZES})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    if group > MAX_QUERIES_PER_KV:
        raise ValueError(f"{group} query heads per KV head; the Triton path supports up to {MAX_QUERIES_PER_KV}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if streaming is not None:
        if window is not None or head_size % 2:
            raise ValueError("streaming reads take their window from `streaming` and need an even head size")
        sinks, window, theta = int(streaming[0]), int(streaming[1]), float(streaming[2])
        if sinks < 0 or window < 1:
            raise ValueError(f"streaming: sink tokens {sinks} must be >= 0 and window {window} >= 1")
        num_splits = 1  # one key range per tile: the decode split is not implemented for the two ranges
    else:
        sinks, theta = 0, 1.0
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_size, dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())

    block_g = triton.next_power_of_2(group)
    # Rows = BLOCK_Q tokens x BLOCK_G heads: at least 16 (tl.dot's minimum), at most 64 (prefill tiles); decode
    # batches get the fewest tokens per tile so a program does not carry many empty rows.
    block_q = max(min(triton.next_power_of_2(max(max_query_len, 1)), 64 // block_g), 16 // block_g, 1)
    block_d = triton.next_power_of_2(head_size)
    if block_n is None:
        # Prefill tiles of 128-wide heads keep 32 keys per step (register pressure); decode tiles have 16 rows only
        # and stream faster with 64 (H100, bf16, head 128: batch 32 x 32 KV heads 0.85 -> 0.73 ms at 4k context).
        block_n = 64 if block_d <= 64 or (max_query_len == 1 and block_d <= 128) else 32
    if num_splits is None:
        num_splits = _default_num_splits(q.device, num_seqs, num_kv_heads, max_query_len, max_seq_len, block_n)
    num_splits = max(1, int(num_splits))

    if num_splits > 1:
        target = torch.empty(num_splits, num_tokens, num_heads, head_size, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
        stride_os, stride_ot, stride_oh = target.stride(0), target.stride(1), target.stride(2)
    else:
        target, lse = out, out  # lse is never touched with one split; any tensor will do as the argument
        stride_os, stride_ot, stride_oh = 0, out.stride(0), out.stride(1)

    upcast = _UPCAST_BF16_DOT and q.dtype == torch.bfloat16
    grid = (num_tokens // block_q + num_seqs, num_kv_heads * num_splits)
    _paged_attention_kernel[grid](
        q, kv_slots, target, lse, query_start_loc, seq_lens, block_table,
        num_seqs, num_tokens, num_heads,
        float(scale) * LOG2E,
        int(window or 0),
        q.stride(0), q.stride(1),
        kv_slots.stride(0), kv_slots.stride(1),
        stride_os, stride_ot, stride_oh,
        block_table.stride(0),
        sinks,
        math.log2(theta),
        float(scales[0]), float(scales[1]),
        NUM_Q_PER_KV=group,
        HEAD_SIZE=head_size,
        BLOCK_D=block_d,
        BLOCK_G=block_g,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_SIZE=int(block_size),
        STRICT=bool(strict),
        USE_WINDOW=window is not None and streaming is None,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if (q.dtype == torch.float32 or upcast) else "tf32",
        UPCAST_DOT=upcast,
        STREAMING=streaming is not None,
        FP8=fmt,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            target, lse, out,
            num_tokens, num_heads,
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_SIZE=head_size,
            BLOCK_D=block_d,
        )
    return out
