"""The portable attention path: gather the pages a step reads, then one SDPA call per layer (any device, any shape).

Not the naive "gather each sequence's pages per layer" loop: everything that depends only on the batch (padded
query/key index tensors, masks) is built once per step (`_StepIndex`, kept on the step), so each layer costs one
gather, one SDPA call and one scatter; and consecutive layers that read the same producer (LCKV's consumers all
read one layer) reuse one gathered copy as long as no pages were written in between (`LCKVStep.kv_version`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import UNIT_SCALES, AttentionPath, slot_view
from .step import LCKVStep


class TorchPath(AttentionPath):
    name = "torch"

    def write_kv(self, key, value, kv_cache, slot_mapping, step=None, scales=UNIT_SCALES) -> None:
        slots = slot_view(kv_cache)
        if step is not None:
            step.kv_version += 1
        sm = slot_mapping.long()
        valid = sm >= 0
        if not bool(valid.all()):
            sm, key, value = sm[valid], key[valid], value[valid]
        pd = self.page_dtype
        if pd.quantized:
            rows = torch.cat([pd.store(key, scales[0]), pd.store(value, scales[1])], -1)
        else:
            rows = torch.cat([key, value], -1).to(slots.dtype)
        # one copy of whole slots (K and V side by side), not two strided scatters into halves of the last axis
        slots.index_copy_(0, sm, rows)

    def zero_slots(self, kv_cache, step) -> None:
        slots = slot_view(kv_cache)
        step.kv_version += 1
        sm = step.slot_mapping.long()
        slots[sm[sm >= 0]] = 0

    def attend(self, q, kv_cache, step, *, scale, strict, window, out, scales=UNIT_SCALES):
        T, Hq, D = q.shape
        block_size = kv_cache.shape[2] if kv_cache.dim() == 4 else None
        slots = slot_view(kv_cache)
        idx = _step_index(step, block_size, q.device)
        assert step.num_actual_tokens == T, (step.num_actual_tokens, T)
        Hk = slots.shape[1]
        key = (slots.data_ptr(), step.kv_version, q.dtype)
        if step.gathered is not None and step.gathered[0] == key:
            k, v = step.gathered[1]  # same producer, unchanged since the previous layer gathered it
        else:
            # index_select on the 2-D [slots, Hk*2D] view copies whole rows: ~6x faster on CPU than advanced indexing
            kv = slots.view(slots.shape[0], -1).index_select(0, idx.k_slot_flat).view(idx.B, idx.K, Hk, 2 * D)
            k, v = self._values(kv, D, scales, q.dtype)
            step.gathered = (key, (k, v))  # one entry: the copy lives only while consecutive layers share it
        vis, has_key = idx.mask(strict, window)
        if idx.single_query:
            qp = q[:, None]  # [B, 1, Hq, D], one query per sequence: no padding
        else:
            qp = q.new_zeros(idx.B, idx.Q, Hq, D)
            qp[idx.q_valid] = q
        o = F.scaled_dot_product_attention(
            qp.transpose(1, 2), k, v, attn_mask=vis, scale=scale, enable_gqa=Hq != Hk
        ).transpose(1, 2)  # [B, Q, Hq, D]
        # A row that sees no key (position 0 under the strict mask) is defined as 0, not NaN and not a uniform average.
        if has_key is not None:
            o = torch.where(has_key[:, :, None, None], o, 0.0)
        out.copy_(o[:, 0] if idx.single_query else o[idx.q_valid])
        return out

    def _values(self, kv: torch.Tensor, D: int, scales, dtype: torch.dtype):
        """Gathered page rows `[B, K, Hk, 2D]` -> K and V `[B, Hk, K, D]` in `dtype` (dequantized for fp8 pages)."""
        k, v = kv[..., :D].transpose(1, 2), kv[..., D:].transpose(1, 2)
        pd = self.page_dtype
        if pd.quantized:
            return pd.load(k, scales[0], dtype), pd.load(v, scales[1], dtype)
        return k.to(dtype), v.to(dtype)

    def attend_streaming(self, q, kv_cache, step, *, scale, strict, out, read, scales=UNIT_SCALES):
        return read.gather_attend(q, kv_cache, step, scale=scale, strict=strict, out=out, page_dtype=self.page_dtype,
                                  scales=scales)


class _StepIndex:
    """Per-step gather/scatter indices and masks, shared by all layers of the step."""

    def __init__(self, step: LCKVStep, block_size: int, device: torch.device):
        B = step.num_reqs
        q_lens, seq_lens = step.query_lens_cpu, step.seq_lens_cpu
        Q = step.max_query_len
        K = step.max_seq_len
        self.B, self.Q, self.K = B, Q, K
        self.block_size = block_size
        j = torch.arange(Q)
        self.q_pos = (step.context_lens_cpu[:, None] + j[None, :]).to(device)  # [B, Q] position of each padded query
        self.q_valid = (j[None, :] < q_lens[:, None]).to(device)  # [B, Q]
        kp = torch.arange(K)
        self.k_valid = (kp[None, :] < seq_lens[:, None]).to(device)  # [B, K]
        bt = step.block_table.long()
        nblk = (K + block_size - 1) // block_size
        if nblk > bt.shape[1]:
            raise RuntimeError(f"block table has {bt.shape[1]} blocks per sequence, need {nblk}")
        kpd = kp.to(bt.device)
        slot = bt[:, kpd // block_size] * block_size + (kpd % block_size)[None, :]  # [B, K]
        self.k_slot_flat = torch.where(self.k_valid, slot.to(device), 0).reshape(-1)
        self.k_pos = kp.to(device)
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
            if bool((has_key | ~self.q_valid).all()):
                has_key = None  # every real query sees a key (always so unless a strict row sits at position 0)
            m = (vis[:, None, :, :], has_key)
            self.masks[key] = m
        return m


def _step_index(step: LCKVStep, block_size: int, device: torch.device) -> _StepIndex:
    idx = step.torch_index
    if idx is None or idx.block_size != block_size:
        idx = step.torch_index = _StepIndex(step, block_size, device)
    return idx
