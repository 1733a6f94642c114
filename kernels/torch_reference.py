"""Float64 torch references for the Triton kernels in this folder: the oracle of `kernels/test_*.py`.

They are written to be obviously correct rather than fast: each sequence is gathered key by key from its block
table, the visibility mask is spelled out from the definitions (docs/semantics.md), and everything is computed in float64.
They deliberately share no code with `lckv_vllm/engine/attention/torch_path.py`, so a test against them is an
independent check of both.
"""

from __future__ import annotations

import torch

# fp8 pages (docs/semantics.md, section 6): uint8 tensors holding these formats' bits
FP8_TORCH = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fp8_bits_ref(x: torch.Tensor, fp8: str, scale: float) -> torch.Tensor:
    """The page bytes of `x`: fp8(x / scale) with the division in float32 (as the kernel divides), saturated at
    the format's largest finite value, rounded to nearest even (torch's cast)."""
    dt = FP8_TORCH[fp8]
    top = torch.finfo(dt).max
    return (x.to(torch.float32) / scale).clamp(-top, top).to(dt).view(torch.uint8)


def page_values_ref(raw: torch.Tensor, fp8: str | None, scale: float) -> torch.Tensor:
    """Page elements as float64: fp8 * scale for fp8 pages, the stored floats otherwise."""
    if fp8 is None:
        return raw.to(torch.float64)
    return raw.view(FP8_TORCH[fp8]).to(torch.float64) * scale


def write_kv_ref(key: torch.Tensor, value: torch.Tensor, kv_slots: torch.Tensor, slot_mapping: torch.Tensor,
                 fp8: str | None = None, scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """kv_slots[slot, :, :D] = key[t], kv_slots[slot, :, D:] = value[t] for every token t whose slot is not -1
    (their fp8 bytes, `fp8_bits_ref`, for fp8 pages)."""
    d = key.shape[-1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        if fp8 is None:
            kv_slots[slot, :, :d] = key[t].to(kv_slots.dtype)
            kv_slots[slot, :, d:] = value[t].to(kv_slots.dtype)
        else:
            kv_slots[slot, :, :d] = fp8_bits_ref(key[t], fp8, scales[0])
            kv_slots[slot, :, d:] = fp8_bits_ref(value[t], fp8, scales[1])


def zero_slots_ref(kv_slots: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_slots[slot] = 0 for every slot that is not -1."""
    for slot in slot_mapping.tolist():
        if slot >= 0:
            kv_slots[slot] = 0


def paged_attention_ref(
    q: torch.Tensor,
    kv_slots: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    scale: float,
    strict: bool,
    window: int | None,
    fp8: str | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Attention of packed varlen queries over paged K/V, in float64.  Returns `[num_tokens, num_heads, head_size]`.

    q: [num_tokens, num_heads, D]; kv_slots: [num_slots, num_kv_heads, 2D] (K then V); query_start_loc:
    [num_seqs + 1]; seq_lens: [num_seqs] (context + query tokens); block_table: [num_seqs, max_blocks].
    Query i of sequence s sits at position seq_len - query_len + i and sees key position p iff
    p <= t (p < t when strict) and, with a window w, p > t - w.  A query that sees no key outputs 0.
    `fp8`: uint8 pages of that format, read as fp8 * `scales` (k, v).
    """
    num_tokens, num_heads, d = q.shape
    num_kv_heads = kv_slots.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, d, dtype=torch.float64)
    qsl = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[s], qsl[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        positions = list(range(seq_len))
        slots = [int(block_table[s, p // block_size]) * block_size + p % block_size for p in positions]
        kv = kv_slots[torch.tensor(slots, dtype=torch.long)].cpu()  # [seq_len, Hk, 2D]
        k, v = page_values_ref(kv[..., :d], fp8, scales[0]), page_values_ref(kv[..., d:], fp8, scales[1])
        qs = q[q0:q1].to(torch.float64).cpu()  # [q_len, Hq, D]
        t = torch.arange(seq_len - q_len, seq_len)[:, None]  # query positions
        p = torch.arange(seq_len)[None, :]  # key positions
        visible = (p < t) if strict else (p <= t)
        if window is not None:
            visible &= p > t - window
        for h in range(num_heads):
            kh = h // group  # GQA: query heads [kh*group, (kh+1)*group) read KV head kh
            scores = (qs[:, h] @ k[:, kh].T) * scale  # [q_len, seq_len]
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key: softmax of all -inf is NaN -> 0
            out[q0:q1, h] = probs @ v[:, kh]
    return out


def rope_ref(x: torch.Tensor, position: float, theta: float) -> torch.Tensor:
    """Neox RoPE of one vector `x` [D] (float64) at `position`: halves rotated pairwise by position * theta^(-2i/D)."""
    d = x.shape[-1]
    half = d // 2
    ang = position * theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    x1, x2 = x[:half], x[half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()])


def streaming_attention_ref(q, kv_slots, query_start_loc, seq_lens, block_table, block_size: int, scale: float,
                            strict: bool, sinks: int, window: int, theta: float, fp8: str | None = None,
                            scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """StreamingLLM reads (docs/semantics.md, section 5), query by query and key by key, in float64: the pages hold
    unrotated keys; query t sees key j iff j <= t (j < t when strict) and (j < sinks or j > t - window); with
    shift = max(0, t - (sinks + window - 1)), the query is rotated at t - shift, a sink key at j, a window key at
    j - shift.  A query that sees no key outputs 0."""
    num_tokens, num_heads, d = q.shape
    group = num_heads // kv_slots.shape[1]
    out = torch.zeros(num_tokens, num_heads, d, dtype=torch.float64)
    qsl = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[s], qsl[s + 1]
        for i in range(q1 - q0):
            t = seq_len - (q1 - q0) + i
            shift = max(0, t - (sinks + window - 1))
            js = [j for j in range(seq_len) if (j < t if strict else j <= t) and (j < sinks or j > t - window)]
            if not js:
                continue
            slots = [int(block_table[s, j // block_size]) * block_size + j % block_size for j in js]
            raw = kv_slots[torch.tensor(slots, dtype=torch.long)].cpu()
            kv = torch.cat([page_values_ref(raw[..., :d], fp8, scales[0]), page_values_ref(raw[..., d:], fp8, scales[1])],
                           -1)
            for h in range(num_heads):
                qr = rope_ref(q[q0 + i, h].to(torch.float64).cpu(), t - shift, theta)
                ks = torch.stack([rope_ref(kv[n, h // group, :d], j if j < sinks else j - shift, theta)
                                  for n, j in enumerate(js)])
                probs = torch.softmax((ks @ qr) * scale, 0)
                out[q0 + i, h] = probs @ kv[:, h // group, d:]
    return out
