"""Paged attention for the LCKV backend: KV writes, zero-fill of producer slots, and attention reads.

One switch picks who does the math: `LCKV_ATTENTION_IMPL` = `auto` (Triton on CUDA, torch elsewhere) | `triton` |
`torch`.  The torch path below is the CPU workhorse.  It is not the naive "gather each sequence's pages per layer"
loop: everything that depends only on the batch (padded query/key index tensors, masks) is built once per step and
cached on the step's metadata, so each layer costs one gather, one SDPA call and one scatter.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

IMPL_ENV = "LCKV_ATTENTION_IMPL"


def selected_impl(device: torch.device | None = None) -> str:
    choice = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{IMPL_ENV}={choice!r}: expected one of auto, torch, triton")
    if choice == "auto":
        return "triton" if (device is not None and device.type == "cuda") else "torch"
    return choice


def slot_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """A producer's cache as `[num_slots, num_kv_heads, 2 * head_size]` (K first half, V second half).

    vLLM hands each layer a logical `[num_blocks, num_kv_heads, block_size, 2 * head_size]` view whose physical order
    is LBNHC (the layout our backend asks for), i.e. token-major; transposing back gives a contiguous tensor.
    """
    if kv_cache.dim() == 3:
        return kv_cache
    nb, h, bs, c = kv_cache.shape
    phys = kv_cache.transpose(1, 2)
    assert phys.is_contiguous(), "LCKV KV pages must be token-major (LBNHC layout)"
    return phys.reshape(nb * bs, h, c)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store `key`/`value` `[num_tokens, num_kv_heads, head_size]` at `slot_mapping` (−1 = padding, skipped)."""
    slots = slot_view(kv_cache)
    d = key.shape[-1]
    sm = slot_mapping.long()
    valid = sm >= 0
    if not bool(valid.all()):
        sm, key, value = sm[valid], key[valid], value[valid]
    slots[sm, :, :d] = key.to(slots.dtype)
    slots[sm, :, d:] = value.to(slots.dtype)


def zero_slots(kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Zero the K/V of this step's tokens: the starting point of an iterative prefill (DESIGN.md §1)."""
    slots = slot_view(kv_cache)
    sm = slot_mapping.long()
    sm = sm[sm >= 0]
    slots[sm] = 0


def attend(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md,
    *,
    scale: float,
    strict: bool,
    window: int | None,
) -> torch.Tensor:
    """Attention of this step's queries `[num_tokens, num_heads, head_size]` over the pages in `kv_cache`.

    `strict`: the query at position t sees keys < t (a query with no visible key outputs exactly 0); otherwise ≤ t.
    `window`: only the `window` most recent positions t-window+1 … t are visible (minus t itself when strict).
    """
    if selected_impl(q.device) == "triton":
        raise NotImplementedError(f"{IMPL_ENV}=triton: the Triton kernels are not part of this build yet")
    return torch_attend(q, kv_cache, md, scale=scale, strict=strict, window=window)


# --------------------------------------------------------------------------------------------------------------------
# torch path


class _StepIndex:
    """Per-step gather/scatter indices, shared by all layers (cached on the metadata)."""

    def __init__(self, md, block_size: int, device: torch.device):
        qsl = (md.query_start_loc_cpu if md.query_start_loc_cpu is not None else md.query_start_loc).cpu().long()
        B = md.num_reqs
        qsl = qsl[: B + 1]
        seq_lens = (md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens).cpu().long()[:B]
        q_lens = qsl[1:] - qsl[:-1]
        Q = int(q_lens.max()) if B else 0
        K = int(seq_lens.max()) if B else 0
        self.B, self.Q, self.K = B, Q, K
        j = torch.arange(Q)
        q_valid = j[None, :] < q_lens[:, None]  # [B, Q]
        ctx = seq_lens - q_lens
        self.q_pos = (ctx[:, None] + j[None, :]).to(device)  # [B, Q] absolute position of each padded query
        self.q_valid = q_valid.to(device)
        kp = torch.arange(K)
        self.k_valid = (kp[None, :] < seq_lens[:, None]).to(device)  # [B, K]
        bt = md.block_table[:B].long()
        nblk = (K + block_size - 1) // block_size
        if nblk > bt.shape[1]:
            raise RuntimeError(f"block table has {bt.shape[1]} blocks per sequence, need {nblk}")
        kpd = kp.to(bt.device)
        slot = bt[:, kpd // block_size] * block_size + (kpd % block_size)[None, :]  # [B, K]
        self.k_slot = torch.where(self.k_valid, slot.to(device), 0)
        self.k_pos = kp.to(device)
        self.num_tokens = int(qsl[-1])
        self.masks: dict = {}
        self.single_query = Q == 1

    def mask(self, strict: bool, window: int | None):
        key = (strict, window)
        m = self.masks.get(key)
        if m is None:
            qp = self.q_pos[:, :, None]
            kp = self.k_pos[None, None, :]
            vis = (kp < qp) if strict else (kp <= qp)
            if window is not None:
                vis = vis & (kp > qp - window)
            vis = vis & self.k_valid[:, None, :]
            has_key = vis.any(-1)  # [B, Q]
            m = (vis[:, None, :, :], has_key)
            self.masks[key] = m
        return m


def _step_index(md, block_size: int, device: torch.device) -> _StepIndex:
    idx = md.cache.get(("torch_index", block_size))
    if idx is None:
        idx = _StepIndex(md, block_size, device)
        md.cache[("torch_index", block_size)] = idx
    return idx


def torch_attend(q, kv_cache, md, *, scale, strict, window):
    T, Hq, D = q.shape
    block_size = kv_cache.shape[2] if kv_cache.dim() == 4 else None
    slots = slot_view(kv_cache)
    idx = _step_index(md, block_size, q.device)
    assert idx.num_tokens == T, (idx.num_tokens, T)
    Hk = slots.shape[1]
    kv = slots[idx.k_slot]  # [B, K, Hk, 2D]
    k = kv[..., :D].transpose(1, 2)  # [B, Hk, K, D]
    v = kv[..., D:].transpose(1, 2)
    vis, has_key = idx.mask(strict, window)
    if idx.single_query:
        qp = q[:, None]  # [B, 1, Hq, D], one query per sequence: no padding
    else:
        qp = q.new_zeros(idx.B, idx.Q, Hq, D)
        qp[idx.q_valid] = q
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=vis, scale=scale, enable_gqa=Hq != Hk
    )  # [B, Hq, Q, D]
    out = out.transpose(1, 2)  # [B, Q, Hq, D]
    # A row that sees no key (position 0 under the strict mask) is defined as 0, not NaN and not a uniform average.
    out = torch.where(has_key[:, :, None, None], out, 0.0)
    if idx.single_query:
        return out[:, 0]
    return out[idx.q_valid]
