"""StreamingLLM reads (`lckv_streaming`): sinks + recent window, keys rotated at their cache positions.

Works on the plain page format (the torch and Triton paths' `slot_view`), whose producers stored their keys without
rotary embedding (the model skips vLLM's rotary in this mode).  Per step, once (`_StreamIndex`, kept on the step):
for each sequence the positions it can read at all: the sinks [0, min(S, seq_len)) and the window from
max(S, first query - W + 1) to its last token; so a decode step gathers at most S + W keys however long the stream,
and time per token stays flat.  vLLM's block manager has freed the pages in between (`SinkWindowSpec`,
`sink_window_pages.py`); this index never touches them.

Rotary at read time (docs/semantics.md, "Streaming"): a sink key j is rotated at j and read by the query rotated at
t - shift(t); a window key j is rotated at j - c and read by the query rotated at t - c, where c is one per sequence
(the shift of its last query): the window score depends only on t - j, so one rotated copy of the window serves every
query of the step.  Both scores come out of one SDPA call by putting them in separate halves of a doubled head:
q' = [q_sink | q_window], k' = [k_sink | 0] for sinks and [0 | k_window] for window keys.  Where the two query
rotations coincide for every query of the step (decode steps: the last query's shift is c; sequences still within
sinks + window: no shift), one head of the model's size serves both (`one_frame`): the common case of a stream.
Angles are computed in float64 from the model's RoPE frequencies; none exceeds S + W + the step's query length.

Consecutive layers reading the same producer share one gathered, rotated copy while no pages changed
(`LCKVStep.kv_version`), as in the torch path.

`TorchPath.attend_streaming` runs `gather_attend`.  On the Triton path the same reads run in the paged-attention
kernel (`lckv_vllm.kernels.paged_attention`, `streaming=`): it walks the sink range and the window range of each tile
and rotates queries and key tiles in registers, with the same positions as here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lckv_vllm.rope import inv_freq
from lckv_vllm.streaming_spec import Streaming
from .base import slot_view
from .page_dtype import AUTO, PageDtype
from .step import LCKVStep


class StreamingRead:
    """What every layer of a streaming engine reads with (one object per engine): the mode's sinks and window, the
    RoPE frequencies, and the portable gather implementation (`gather_attend`, the torch path's)."""

    def __init__(self, streaming: Streaming, head_dim: int, rope_theta: float):
        self.s = streaming
        self.head_dim = head_dim
        self.theta = rope_theta
        self.inv_freq = inv_freq(rope_theta, head_dim)

    def gather_attend(self, q, kv_cache, step: LCKVStep, *, scale: float, strict: bool, out: torch.Tensor,
                      page_dtype: PageDtype = AUTO, scales=(1.0, 1.0)) -> torch.Tensor:
        """`page_dtype`/`scales`: what the pages store (fp8 pages are dequantized as gathered, before rotation)."""
        T, Hq, D = q.shape
        block_size = kv_cache.shape[2] if kv_cache.dim() == 4 else None
        slots = slot_view(kv_cache)
        idx = step.stream_index
        if idx is None or idx.block_size != block_size:
            idx = step.stream_index = _StreamIndex(step, block_size, self, q.device)
        Hk = slots.shape[1]
        key = ("stream", slots.data_ptr(), step.kv_version, q.dtype)
        if step.gathered is not None and step.gathered[0] == key:
            k2, v = step.gathered[1]
        else:
            kv = slots.view(slots.shape[0], -1).index_select(0, idx.k_slot_flat).view(idx.B, idx.K, Hk, 2 * D)
            kraw, vraw = kv[..., :D], kv[..., D:]
            if page_dtype.quantized:
                kval, vval = page_dtype.load(kraw, scales[0], q.dtype), page_dtype.load(vraw, scales[1], q.dtype)
            else:
                kval, vval = kraw.to(q.dtype), vraw.to(q.dtype)
            k = _rotate(kval, *idx.trig("k", q.dtype))  # [B, K, Hk, D]
            if idx.one_frame:
                k2 = k.transpose(1, 2)
            else:
                zero = torch.zeros_like(k)
                sink = idx.is_sink[:, :, None, None]
                k2 = torch.cat([torch.where(sink, k, zero), torch.where(sink, zero, k)], -1).transpose(1, 2)
            v = vval.transpose(1, 2)  # [B, Hk, K, D]
            step.gathered = (key, (k2, v))
        if idx.dense:  # one query per sequence, in order: no padding to scatter into
            qp = q.view(idx.B, 1, Hq, D)
        else:
            qp = q.new_zeros(idx.B, idx.Q, Hq, D)
            qp[idx.q_valid] = q
        if idx.one_frame:
            q2 = _rotate(qp, *idx.trig("q_window", q.dtype))
        else:
            q2 = torch.cat([_rotate(qp, *idx.trig("q_sink", q.dtype)), _rotate(qp, *idx.trig("q_window", q.dtype))],
                           -1)
        vis, has_key = idx.mask(strict)
        o = F.scaled_dot_product_attention(q2.transpose(1, 2), k2, v, attn_mask=vis, scale=scale,
                                           enable_gqa=Hq != Hk).transpose(1, 2)  # [B, Q, Hq, D]
        if has_key is not None:  # a query that sees no key outputs exactly 0 (a strict row at position 0)
            o = torch.where(has_key[:, :, None, None], o, 0.0)
        out.copy_(o.reshape(T, Hq, D) if idx.dense else o[idx.q_valid])
        return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style RoPE (rotate halves), as vLLM's Llama applies it; cos/sin are `[B, N, 1, D]`."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


class _StreamIndex:
    """Per-step: which keys each sequence reads, their slots, the masks and the rotary tables."""

    def __init__(self, step: LCKVStep, block_size: int, read: StreamingRead, device: torch.device):
        s = read.s
        S, W = s.sink_tokens, s.window
        B, Q = step.num_reqs, step.max_query_len
        ctx, seq, q_lens = step.context_lens_cpu, step.seq_lens_cpu, step.query_lens_cpu
        self.B, self.Q, self.block_size = B, Q, block_size
        n_sink = seq.clamp(max=S)
        win_lo = torch.clamp(ctx - W + 1, min=S)
        n_win = (seq - win_lo).clamp(min=0)
        n_keys = n_sink + n_win
        K = max(int(n_keys.max()) if B else 0, 1)
        self.K = K
        k = torch.arange(K)[None, :]
        self.is_sink_cpu = k < n_sink[:, None]
        kpos = torch.where(self.is_sink_cpu, k, win_lo[:, None] + (k - n_sink[:, None]))  # [B, K] true positions
        k_valid = k < n_keys[:, None]
        kpos = torch.where(k_valid, kpos, 0)
        bt = step.block_table.long().cpu()
        blocks = kpos // block_size
        if bool(k_valid.any()) and int(blocks[k_valid].max()) >= bt.shape[1]:
            raise RuntimeError(f"block table has {bt.shape[1]} blocks per sequence, need {int(blocks.max()) + 1}")
        slot = torch.gather(bt, 1, blocks) * block_size + kpos % block_size
        self.k_slot_flat = torch.where(k_valid, slot, 0).reshape(-1).to(device)
        j = torch.arange(Q)[None, :]
        qpos = ctx[:, None] + j  # [B, Q]
        q_valid = j < q_lens[:, None]
        self.q_valid = q_valid.to(device)
        # rotary positions: window keys and window queries moved down by c (the last query's shift), sinks not;
        # the sink half of a query by its own shift
        c = (seq - 1 - (s.span - 1)).clamp(min=0)[:, None]
        self._pos = {
            "k": torch.where(self.is_sink_cpu, kpos, kpos - c),
            "q_window": qpos - c,
            "q_sink": qpos - (qpos - (s.span - 1)).clamp(min=0),
        }
        # One rotary frame: where every query's own shift is its sequence's c (decode rows: the last query is the
        # only one; sequences within sinks + window: no shift at all), the sink half of a query is rotated as its
        # window half, so one head of D carries both scores and the doubled head is not needed.
        self.one_frame = bool(((self._pos["q_sink"] == self._pos["q_window"]) | ~q_valid).all())
        self.dense = Q == 1 and bool(q_valid.all())
        self._inv_freq = read.inv_freq
        self._trig: dict = {}
        self._device = device
        self.is_sink = self.is_sink_cpu.to(device)
        # visibility without the causal cut: a key is a sink or inside the query's window, and is a real key
        qp, kp = qpos[:, :, None], kpos[:, None, :]
        base = k_valid[:, None, :] & (self.is_sink_cpu[:, None, :] | (kp > qp - W))
        self._base, self._qp, self._kp, self._q_valid = base, qp, kp, q_valid
        self.masks: dict = {}

    def trig(self, name: str, dtype: torch.dtype):
        key = (name, dtype)
        t = self._trig.get(key)
        if t is None:
            ang = self._pos[name].to(torch.float64)[..., None] * self._inv_freq  # [B, N, D/2]
            ang = torch.cat([ang, ang], -1)[:, :, None, :]
            t = self._trig[key] = (ang.cos().to(dtype).to(self._device), ang.sin().to(dtype).to(self._device))
        return t

    def mask(self, strict: bool):
        m = self.masks.get(strict)
        if m is None:
            causal = (self._kp < self._qp) if strict else (self._kp <= self._qp)
            vis = self._base & causal
            has_key = vis.any(-1)
            if bool((has_key | ~self._q_valid).all()):
                has_key = None
            else:
                has_key = has_key.to(self._device)
            m = self.masks[strict] = (vis[:, None].to(self._device), has_key)
        return m
