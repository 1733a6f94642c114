"""Training core (work in progress): a differentiable, batched LCKV model and the paper's parallel iterative training.

What exists: `TrainableLCKV` loads a checkpoint directory (the official format) into float32 parameters and runs the
served semantics on a batch of equal-length sequences; each cyclic segment runs `m` passes without gradient from
zero-initialised producer K/V, then `b` passes with gradient, and the loss is taken on the last (acyclic plans: one
pass).  `sample_routing` draws a random cross-layer routing (each layer attends to its own K/V or, with probability p,
to a preceding layer's), and `train_step` does one AdamW step.  Checked against the float64 reference in
`tests/test_train.py`.  Not yet: the `lckv-vllm train` command (schedule, evaluation, checkpoints, data), trained
models, and serving them.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .plan import LayerPlan, plan_from_config


class TrainableLCKV(nn.Module):
    def __init__(self, model_dir: str | Path, plan: LayerPlan | None = None):
        super().__init__()
        from types import SimpleNamespace

        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.cfg = SimpleNamespace(**cfg)
        self.plan = plan or plan_from_config(self.cfg)
        sd = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        # parameter names cannot contain dots: store them with "/" and map back when saving
        self.w = nn.ParameterDict({k.replace(".", "/"): nn.Parameter(v.float()) for k, v in sd.items()})
        c = self.cfg
        self.nh = c.num_attention_heads
        self.nkv = getattr(c, "num_key_value_heads", None) or self.nh
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // self.nh
        self.eps = c.rms_norm_eps
        rp = getattr(c, "rope_parameters", None) or {}
        theta = rp.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, self.hd, 2).float() / self.hd)),
                             persistent=False)

    def p(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and "lm_head/weight" not in self.w:
            name = "model.embed_tokens.weight"  # tied embeddings
        return self.w[name.replace(".", "/")]

    def _norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.p(name)

    def _rope(self, x, pos):  # x [B, T, heads, hd], neox style
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[None, :, None, :]
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[None, :, None, :]
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _attend(self, q, k, v, strict: bool, window: int | None):
        """q [B, T, nh, hd], k/v [B, T, nkv, hd]; a query with no visible key outputs exactly 0."""
        T = q.shape[1]
        pos = torch.arange(T, device=q.device)
        vis = (pos[None, :] < pos[:, None]) if strict else (pos[None, :] <= pos[:, None])
        if window is not None:
            vis = vis & (pos[None, :] > pos[:, None] - window)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=vis, enable_gqa=self.nh != self.nkv)
        return torch.where(vis.any(-1)[None, None, :, None], out, 0.0).transpose(1, 2)

    def _layer(self, i, attends_to, strict, window, h, pos, kv: dict):
        pre = f"model.layers.{i}."
        B, T, _ = h.shape
        x = self._norm(h, pre + "input_layernorm.weight")
        q = self._rope((x @ self.p(pre + "self_attn.q_proj.weight").T).view(B, T, self.nh, self.hd), pos)
        if i in kv:  # a producer: (re)computes its K/V, overwriting the zeros or the previous pass's
            k = self._rope((x @ self.p(pre + "self_attn.k_proj.weight").T).view(B, T, self.nkv, self.hd), pos)
            kv[i] = (k, (x @ self.p(pre + "self_attn.v_proj.weight").T).view(B, T, self.nkv, self.hd))
        k, v = kv[attends_to]
        a = self._attend(q, k, v, strict, window)
        h = h + a.reshape(B, T, -1) @ self.p(pre + "self_attn.o_proj.weight").T
        y = self._norm(h, pre + "post_attention_layernorm.weight")
        y = F.silu(y @ self.p(pre + "mlp.gate_proj.weight").T) * (y @ self.p(pre + "mlp.up_proj.weight").T)
        return h + y @ self.p(pre + "mlp.down_proj.weight").T

    def forward(self, tokens: torch.Tensor, routing: list[int] | None = None, m: int | None = None,
                b: int | None = None) -> torch.Tensor:
        """Logits `[B, T, vocab]` of `tokens` `[B, T]` (whole sequences from position 0).

        `routing`: the layer each layer attends to for this step (default: the plan's); a routing must only read
        the layer itself or a preceding one (acyclic).  `m`/`b`: passes without / with gradient for cyclic
        segments (default: the plan's forward/backward passes)."""
        plan = self.plan
        m = plan.forward_passes if m is None else m
        b = plan.backward_passes if b is None else b
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)
        h = self.p("model.embed_tokens.weight")[tokens]
        if routing is not None:
            assert all(j <= i for i, j in enumerate(routing)), routing
            roles = [(i, j, plan.force_nodiag, plan.window(i)) for i, j in enumerate(routing)]
            producers = set(routing)
            segments = [(0, plan.num_layers, False)]
        else:
            roles = [(r.index, r.attends_to, r.strict, plan.window(r.index)) for r in plan.roles]
            producers = set(plan.producers)
            segments = [(s.start, s.end, s.cyclic) for s in plan.segments]
        kv: dict = {}
        for start, end, cyclic in segments:
            for p in producers:
                if start <= p < end:  # this segment's producers start from zeros
                    z = h.new_zeros(B, T, self.nkv, self.hd)
                    kv[p] = (z, z)
            if not cyclic:
                for i in range(start, end):
                    h = self._layer(*roles[i], h, pos, kv)
                continue
            seg_in = h
            for k in range(m + b):
                with torch.set_grad_enabled(torch.is_grad_enabled() and k >= m):
                    if k == m:  # gradient passes start from the no-grad passes' K/V, detached
                        kv = {p: (kk.detach(), vv.detach()) for p, (kk, vv) in kv.items()}
                    h = seg_in
                    for i in range(start, end):
                        h = self._layer(*roles[i], h, pos, kv)
        return self._norm(h, "model.norm.weight") @ self.p("lm_head.weight").T


def sample_routing(num_layers: int, p: float, rng: random.Random) -> list[int]:
    """Random cross-layer routing: each layer reads its own K/V, or with probability `p` a uniformly chosen
    preceding layer's (layer 0 always its own)."""
    return [rng.randrange(i) if i > 0 and rng.random() < p else i for i in range(num_layers)]


def train_step(model: TrainableLCKV, opt: torch.optim.Optimizer, tokens: torch.Tensor,
               routing: list[int] | None = None) -> float:
    """One AdamW step of next-token cross-entropy; returns the loss."""
    logits = model(tokens, routing)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
