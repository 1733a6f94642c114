"""Pure-torch reference of the LCKV semantics: the oracle every vLLM result is compared with.

It loads the same checkpoint directory (config.json + safetensors) and implements docs/semantics.md directly, with no
paging, no batching and no vLLM import, in float64 by default:

* `forward_sequential(tokens)`: token by token, exact (each layer reads the K/V its `attends_to` layer has produced
  so far; a strictly causal layer never sees position t itself; a query with no visible key outputs 0).
* `forward_iterative(tokens, passes, tol)`: the paper's parallel encoding of one chunk: segment by segment, cyclic
  segments run up to `passes` times from the same segment input with the segment's producer K/V for the chunk
  initialised to zeros, stopping early once the K/V stop moving (`tol`, adaptive passes; 0 = all passes).
* `forward_chunked(tokens, chunk_sizes)`: chunk by chunk, earlier chunks final in the cache (chunked prefill,
  prefix-cache hits, decode steps).
* `generate(prompt, n)`: whole-prompt (or chunked) iterative prefill with up to m+b adaptive passes, then one
  token per step: greedy tokens and their log-probabilities, i.e. what the server must produce.

With `lckv_streaming` in the config (StreamingLLM mode, `lckv_vllm/streaming_spec.py`) the cache keeps keys without
rotary embedding and every read applies the sink + window visibility and the pos-shift rotation per query.

`kv_cache_dtype="fp8"` / `"fp8_e4m3"` / `"fp8_e5m2"` (docs/semantics.md, "fp8 pages"): the cache holds what an fp8
page holds, fp8(x / scale) * scale with the producer's scales (from the checkpoint, else 1.0), saturated, rounded
to nearest (`kv_rounding="nearest"`, the torch and Triton paths) or toward zero (`"toward_zero"`, vLLM's CPU kernels
on the `cpu` path); every read, in every pass, sees those values.  Written from the format tables, not with the
engine's code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .plan import LayerPlan, plan_from_config
from .rope import inv_freq, rope_theta
from .settings import DEFAULT_PREFILL_BLOCK, DEFAULT_PREFILL_TOL


class _Cache:
    """Per-producer K/V for positions 0..len-1: `k[p]` is `[len, num_kv_heads, head_dim]`."""

    def __init__(self, producers):
        self.k = {p: None for p in producers}
        self.v = {p: None for p in producers}

    def length(self) -> int:
        for t in self.k.values():
            return 0 if t is None else t.shape[0]
        return 0

    def put(self, p: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V for positions start..start+n-1 (extending or overwriting)."""
        n = k.shape[0]
        old_k, old_v = self.k[p], self.v[p]
        if old_k is None:
            assert start == 0
            self.k[p], self.v[p] = k.clone(), v.clone()
            return
        if old_k.shape[0] < start + n:
            pad = start + n - old_k.shape[0]
            old_k = torch.cat([old_k, old_k.new_zeros(pad, *old_k.shape[1:])])
            old_v = torch.cat([old_v, old_v.new_zeros(pad, *old_v.shape[1:])])
        old_k[start:start + n] = k
        old_v[start:start + n] = v
        self.k[p], self.v[p] = old_k, old_v


_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# checkpoint names of a layer's K/V scales (vLLM's spellings); "kv_scale" is one scale for both
_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:attn\.|k_proj\.|v_proj\.)?(k_scale|v_scale|kv_scale)$")


def _fp8_values(fmt: str) -> torch.Tensor:
    """Every finite non-negative value of the 8-bit format, ascending (float64)."""
    codes = torch.arange(128, dtype=torch.uint8).view(_FP8[fmt]).to(torch.float64)
    return codes[torch.isfinite(codes)].sort().values


def fp8_round_trip(x: torch.Tensor, fmt: str, rounding: str, scale: float) -> torch.Tensor:
    """fp8(x / scale) * scale in float64, saturated at the format's largest value: to nearest (ties to even, IEEE)
    or toward zero (the largest representable magnitude not above |x / scale|, looked up in the format's table)."""
    table = _fp8_values(fmt)
    y = (x.to(torch.float64) / scale).clamp(-float(table[-1]), float(table[-1]))
    if rounding == "toward_zero":
        q = table[torch.searchsorted(table, y.abs().contiguous(), right=True) - 1]
    elif rounding == "nearest":
        q = y.to(_FP8[fmt]).to(torch.float64).abs()
    else:
        raise ValueError(f"rounding {rounding!r}")
    return (torch.sign(y) * q * scale).to(x.dtype)


class ReferenceModel:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float64, overrides: dict | None = None,
                 kv_cache_dtype: str = "auto", kv_rounding: str = "nearest"):
        """`overrides`: config fields replaced as a deploy-time override does (e.g. another `layer_types`).
        `kv_cache_dtype` / `kv_rounding`: what the cache stores (module docstring)."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg.update(overrides or {})
        self.cfg = SimpleNamespace(**cfg)
        self.plan: LayerPlan = plan_from_config(self.cfg)
        self.dtype = dtype
        sd = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        self.kv_scales = {}  # layer -> [k_scale, v_scale]
        for name in [n for n in sd if _SCALE.match(n)]:
            layer, which = _SCALE.match(name).groups()
            pair = self.kv_scales.setdefault(int(layer), [1.0, 1.0])
            value = float(sd.pop(name).reshape(-1)[0])
            for j in {"k_scale": (0,), "v_scale": (1,), "kv_scale": (0, 1)}[which]:
                pair[j] = value
        self.w = {k: v.to(dtype) for k, v in sd.items()}
        if kv_cache_dtype not in ("auto", *_FP8):
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}")
        self.kv_cache_dtype, self.kv_rounding = kv_cache_dtype, kv_rounding
        c = self.cfg
        self.H = c.hidden_size
        self.nh = c.num_attention_heads
        self.nkv = getattr(c, "num_key_value_heads", None) or self.nh
        self.hd = getattr(c, "head_dim", None) or self.H // self.nh
        self.eps = c.rms_norm_eps
        if getattr(c, "tie_word_embeddings", False) or "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.inv_freq = inv_freq(rope_theta(c), self.hd)
        self.streaming = self.plan.streaming

    # ---- building blocks --------------------------------------------------------------------------------------
    def _norm(self, x, name):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.w[name]

    def _rope(self, x, pos):  # x [n, heads, hd], neox style (rotate halves)
        freqs = pos.to(torch.float64)[:, None] * self.inv_freq[None, :]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(x.dtype)[:, None, :]
        sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(x.dtype)[:, None, :]
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _lin(self, x, name):
        return x @ self.w[name].T

    def _page(self, x, layer: int, which: int):
        """What layer `layer`'s page keeps of `x` (K: which=0, V: 1): x, or its fp8 round trip."""
        if self.kv_cache_dtype == "auto":
            return x
        scale = self.kv_scales.get(layer, (1.0, 1.0))[which]
        return fp8_round_trip(x, self.kv_cache_dtype, self.kv_rounding, scale)

    def _mlp(self, x, i):
        p = f"model.layers.{i}.mlp."
        return self._lin(F.silu(self._lin(x, p + "gate_proj.weight")) * self._lin(x, p + "up_proj.weight"),
                         p + "down_proj.weight")

    def _attend(self, q, K, V, qpos, strict, window):
        """q [n, nh, hd] at positions qpos; K/V [S, nkv, hd] at positions 0..S-1."""
        S = K.shape[0]
        kpos = torch.arange(S)
        vis = (kpos[None, :] < qpos[:, None]) if strict else (kpos[None, :] <= qpos[:, None])
        if window is not None:
            vis &= kpos[None, :] > qpos[:, None] - window
        rep = self.nh // self.nkv
        Kr = K.repeat_interleave(rep, dim=1)  # [S, nh, hd]
        Vr = V.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, Kr) / math.sqrt(self.hd)
        scores = scores.masked_fill(~vis[None], float("-inf"))
        has = vis.any(-1)  # [n]
        probs = torch.softmax(torch.where(has[None, :, None], scores, torch.zeros_like(scores)), -1)
        out = torch.einsum("hqk,khd->qhd", probs, Vr)
        return torch.where(has[:, None, None], out, torch.zeros_like(out))  # no visible key -> exactly 0

    def _attend_streaming(self, q, K, V, qpos, strict):
        """StreamingLLM read: per query t, the sinks and the last `window` keys, rotated at their cache positions
        (sinks at j, window keys at j - shift(t)) against the query at t - shift(t).  K is stored unrotated."""
        st = self.streaming
        rep = self.nh // self.nkv
        out = q.new_zeros(q.shape)
        for r, t in enumerate(qpos.tolist()):
            js = [j for j in range(K.shape[0]) if st.visible(t, j, strict)]
            if not js:
                continue  # no visible key -> exactly 0
            shift = st.shift(t)
            kpos = torch.tensor([j if j < st.sink_tokens else j - shift for j in js])
            k = self._rope(K[js], kpos).repeat_interleave(rep, dim=1)  # [n, nh, hd]
            qr = self._rope(q[r:r + 1], torch.tensor([t - shift]))[0]  # [nh, hd]
            probs = torch.softmax(torch.einsum("hd,khd->hk", qr, k) / math.sqrt(self.hd), -1)
            out[r] = torch.einsum("hk,khd->hd", probs, V[js].repeat_interleave(rep, dim=1))
        return out

    def _layer(self, i, h, pos, cache: _Cache, start: int):
        role = self.plan.roles[i]
        p = f"model.layers.{i}."
        x = self._norm(h, p + "input_layernorm.weight")
        n = h.shape[0]
        # streaming: queries and keys stay unrotated here; the read rotates them at their cache positions
        rope = (lambda x, _pos: x) if self.streaming else self._rope
        q = rope(self._lin(x, p + "self_attn.q_proj.weight").view(n, self.nh, self.hd), pos)
        if role.computes_kv:
            k = rope(self._lin(x, p + "self_attn.k_proj.weight").view(n, self.nkv, self.hd), pos)
            v = self._lin(x, p + "self_attn.v_proj.weight").view(n, self.nkv, self.hd)
            cache.put(i, start, self._page(k, i, 0), self._page(v, i, 1))
        j = role.attends_to
        K, V = cache.k[j], cache.v[j]
        if K is None:  # the read layer has produced nothing yet (first token, top layer): nothing visible
            K = q.new_zeros(0, self.nkv, self.hd)
            V = K
        if self.streaming:
            a = self._attend_streaming(q, K, V, pos, role.strict)
        else:
            a = self._attend(q, K, V, pos, role.strict, self.plan.window(i))
        h = h + self._lin(a.reshape(n, -1), p + "self_attn.o_proj.weight")
        return h + self._mlp(self._norm(h, p + "post_attention_layernorm.weight"), i)

    def _logits(self, h):
        return self._lin(self._norm(h, "model.norm.weight"), "lm_head.weight")

    def _out(self, h, head: bool):
        """What a forward returns: the logits, or (`head=False`) the final-norm hidden states, which vLLM's pooling
        models pool (embeddings)."""
        return self._logits(h) if head else self._norm(h, "model.norm.weight")

    # ---- the three encodings ------------------------------------------------------------------------------------
    def new_cache(self) -> _Cache:
        return _Cache(self.plan.producers)

    @torch.no_grad()
    def forward_sequential(self, tokens, head: bool = True) -> torch.Tensor:
        """Token by token (exact).  Returns logits [len(tokens), vocab] (`head=False`: hidden states)."""
        cache = self.new_cache()
        out = []
        for t, tok in enumerate(tokens):
            h = self.w["model.embed_tokens.weight"][torch.tensor([tok])]
            pos = torch.tensor([t])
            for i in range(self.plan.num_layers):
                h = self._layer(i, h, pos, cache, t)
            out.append(self._out(h, head))
        return torch.cat(out)

    def prefill_tol(self, tol: float | None) -> float:
        """The tolerance of adaptive passes: `tol`, else the config's `lckv_prefill_tol`, else the plugin's default
        (what the server runs).  `use_sequential` encodes every token exactly, so it never stops early."""
        if self.plan.use_sequential:
            return 0.0
        if tol is None:
            tol = getattr(self.cfg, "lckv_prefill_tol", None)
        return DEFAULT_PREFILL_TOL if tol is None else float(tol)

    def prefill_block(self, block: int | None) -> int:
        """Positions per prefill block: `block`, else the config's `lckv_prefill_block`, else the plugin's default;
        0 when the config turns chunked prefill off (whole-prompt mode has no blocks), as the server resolves it."""
        if block is not None:
            return int(block)
        if getattr(self.cfg, "lckv_chunked_prefill", True) is False:
            return 0
        block = getattr(self.cfg, "lckv_prefill_block", None)
        return DEFAULT_PREFILL_BLOCK if block is None else int(block)

    @torch.no_grad()
    def forward_chunk(self, tokens, cache: _Cache, passes: int | None = None, tol: float = 0.0,
                      stats: list | None = None, block: int | None = None, head: bool = True) -> torch.Tensor:
        """Encode one chunk after the tokens already in `cache` (final).  Returns the chunk's logits (`head=False`:
        its final-norm hidden states).

        `block` (default: the server's, `prefill_block`): the chunk is cut at the multiples of `block` (absolute
        positions) and the pieces are encoded one after the other, each a chunk of its own (docs/semantics.md,
        "prefill blocks"); 0: the chunk as one piece.  Everything below is per piece.

        Default passes: m+b, or with `use_sequential` one per token of the chunk (every token exact).
        `tol` > 0: adaptive passes (docs/semantics.md): after each pass from the second on, the chunk's first token
        whose producer K/V moved by more than `tol` (relative) is its first unconverged token; the next pass
        recomputes only from there on (and from the first inexact token on), and the chunk stops iterating when no
        token moved more than `tol`.  `tol=0` (default): every pass over the whole chunk.  `stats`, when given,
        receives one (passes used, change of the last pass or None) per cyclic segment."""
        block = self.prefill_block(block)
        start, n = cache.length(), len(tokens)
        if block > 0 and start // block != (start + n - 1) // block:
            cuts = [start] + list(range((start // block + 1) * block, start + n, block)) + [start + n]
            return torch.cat([self.forward_chunk(tokens[a - start:b - start], cache, passes, tol, stats, block=0,
                                                 head=head) for a, b in zip(cuts, cuts[1:])])
        if passes is None:
            passes = max(len(tokens), 1) if self.plan.use_sequential else self.plan.num_passes
        if self.plan.use_sequential:
            tol = 0.0
        pos = torch.arange(start, start + n)
        h = self.w["model.embed_tokens.weight"][torch.tensor(list(tokens))]
        for seg in self.plan.segments:
            if not seg.cyclic:
                for i in seg.layers:
                    h = self._layer(i, h, pos, cache, start)
                continue
            producers = [p for p in seg.layers if self.plan.roles[p].computes_kv]
            for p in producers:  # producer K/V of the chunk's tokens start from zeros
                z = h.new_zeros(n, self.nkv, self.hd)
                cache.put(p, start, z, z)
            seg_in = h
            if tol == 0:
                for _ in range(passes):
                    h = seg_in
                    for i in seg.layers:
                        h = self._layer(i, h, pos, cache, start)
                if stats is not None:
                    stats.append((min(passes, n), None))
                continue
            h = seg_in
            for i in seg.layers:
                h = self._layer(i, h, pos, cache, start)
            h = h.clone()
            prev = self._chunk_kv(cache, producers, start, n)
            first, used, last = 0, 1, 0.0
            for k in range(2, passes + 1):
                first = max(first, k - 1)  # after pass k-1 the first k-1 tokens are exact
                if first >= n:
                    break
                x = seg_in[first:]
                for i in seg.layers:
                    x = self._layer(i, x, pos[first:], cache, start + first)
                h[first:] = x
                new = self._chunk_kv(cache, producers, start, n)
                change = self._row_change(new[:, first:], prev[:, first:])
                prev, used, last = new, k, float(change.max())
                moved = (change > tol).nonzero()
                first = first + int(moved[0]) if moved.numel() else n
            if stats is not None:
                stats.append((used, last))
        return self._out(h, head)

    def _chunk_kv(self, cache: _Cache, producers, start: int, n: int) -> torch.Tensor:
        """The chunk's K/V of `producers`: `[P, n, 2 * nkv * hd]`."""
        return torch.stack([torch.cat([cache.k[p][start:start + n].reshape(n, -1),
                                       cache.v[p][start:start + n].reshape(n, -1)], -1) for p in producers])

    @staticmethod
    def _row_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Per token: max over producers of ||new - old|| / ||new|| (0 when nothing moved)."""
        d = (new - old).norm(dim=-1)
        nrm = new.norm(dim=-1)
        ratio = torch.where(nrm > 0, d / nrm.clamp_min(1e-300), torch.where(d > 0, math.inf, 0.0))
        return ratio.amax(0)

    def forward_iterative(self, tokens, passes: int | None = None, tol: float = 0.0) -> torch.Tensor:
        """The whole prompt as one chunk and one block (the whole-prompt mode)."""
        return self.forward_chunk(tokens, self.new_cache(), passes, tol, block=0)

    def forward_chunked(self, tokens, chunk_sizes, passes: int | None = None, tol: float = 0.0,
                        block: int | None = None, head: bool = True) -> torch.Tensor:
        cache = self.new_cache()
        out, i = [], 0
        for size in chunk_sizes:
            out.append(self.forward_chunk(tokens[i:i + size], cache, passes, tol, block=block, head=head))
            i += size
        assert i == len(tokens), "chunk sizes must cover the tokens"
        return torch.cat(out)

    @torch.no_grad()
    def generate(self, prompt, max_tokens: int, chunk_sizes=None, eos_token_id: int | None = None,
                 tol: float | None = None, block: int | None = None):
        """Greedy decoding as the server does it: whole-prompt (or chunk-by-chunk) prefill, then one token per step.
        `tol`: adaptive passes of the prefill and of each decode step (default: the server's, `prefill_tol`);
        `block`: prefill blocks (default: the server's, `prefill_block`; 0 for the whole-prompt mode).

        Returns (token ids, log-probabilities of the chosen tokens).
        """
        tol = self.prefill_tol(tol)
        cache = self.new_cache()
        chunk_sizes = chunk_sizes or [len(prompt)]
        i = 0
        for size in chunk_sizes:
            logits = self.forward_chunk(prompt[i:i + size], cache, tol=tol, block=block)
            i += size
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            lp = torch.log_softmax(logits[-1].double(), -1)
            tok = int(torch.argmax(lp))
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            if eos_token_id is not None and tok == eos_token_id:
                break
            logits = self.forward_chunk([tok], cache, tol=tol)
        return tokens, logprobs
