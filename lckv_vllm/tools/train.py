"""Training: a differentiable, batched LCKV model and the paper's parallel iterative training (`lckv-vllm train`).

`TrainableLCKV` loads a checkpoint directory (the official format) into float32 parameters and runs the
served semantics on a batch of equal-length sequences; each cyclic segment runs `m` passes without gradient from
zero-initialised producer K/V, then `b` passes with gradient, and the loss is taken on the last (acyclic plans: one
pass).  `sample_routing` draws a random cross-layer routing (each layer attends to its own K/V or, with probability p,
to a preceding layer's), and `train_step` does one AdamW step.  Checked against the float64 reference in
`tests/test_train.py`.  `train` is the command's loop: random windows of the text, AdamW with warm-up + cosine,
periodic held-out loss, resumable state, and an official-format checkpoint (the source's tokenizer files) at the end.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import LayerPlan, plan_from_config
from ..rope import inv_freq, rope_theta


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
        missing = [p for p in self.plan.producers if f"model.layers.{p}.self_attn.k_proj.weight" not in sd]
        if missing:
            raise ValueError(f"layer_types: layers {missing} compute KV under {self.plan.layer_types!r} but the "
                             f"checkpoint has no k/v projections for them (it was saved with another plan)")
        self.w = nn.ParameterDict({k.replace(".", "/"): nn.Parameter(v.float()) for k, v in sd.items()})
        c = self.cfg
        self.nh = c.num_attention_heads
        self.nkv = getattr(c, "num_key_value_heads", None) or self.nh
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // self.nh
        self.eps = c.rms_norm_eps
        self.register_buffer("inv_freq", inv_freq(rope_theta(c), self.hd, torch.float32), persistent=False)

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


ROUTE_RULES = ("uniform", "keep-every")


def sample_routing(num_layers: int, p: float, rng: random.Random, rule: str = "uniform") -> list[int]:
    """Random cross-layer routing, one per training step (one forward pass, the same routing for the whole batch).

    "uniform" (stochastic KV routing, arXiv 2604.22782): each layer i > 0 independently reads, with probability
    `p`, the K/V of a layer drawn uniformly from 0..i-1, else its own (layer 0 always its own).
    "keep-every" (this project's variant): with probability `p` the step uses one pattern of the deploy rule "keep
    every k-th layer, the others read the nearest kept layer below", k drawn uniformly from 2..4 (k < num_layers),
    else the identity.  Uniform routing spreads training over all acyclic routings, most of which no deployment
    uses; this one trains exactly the patterns `lckv-vllm plan` offers (cla-2/3/4)."""
    if rule == "uniform":
        return [rng.randrange(i) if i > 0 and rng.random() < p else i for i in range(num_layers)]
    if rule == "keep-every":
        ks = [k for k in (2, 3, 4) if k < num_layers]
        if not ks or rng.random() >= p:
            return list(range(num_layers))
        k = rng.choice(ks)
        return [i - i % k for i in range(num_layers)]
    raise ValueError(f"--route-rule: {rule!r} is not one of {', '.join(ROUTE_RULES)}")


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


# ---- the training loop ---------------------------------------------------------------------------------------------
STATE_FILE = "train_state.pt"
# What a resumed run must share with the run that wrote the state (anything else would silently change the run).
RESUME_FIELDS = ("layer_types", "steps", "batch", "seq_len", "lr", "warmup", "route_prob", "route_rule", "seed")


def save_checkpoint(model: TrainableLCKV, src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the model in the official format: the source's config with the trained plan's `layer_types`, its
    tokenizer files, and the weights in `dtype`; layers that do not compute KV under the plan carry no k/v
    projections."""
    import shutil

    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", STATE_FILE,
                                                                          "train_report.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_types"] = model.plan.layer_types
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    consumers = {r.index for r in model.plan.roles if not r.computes_kv}
    sd = {}
    for key, value in model.w.items():
        name = key.replace("/", ".")
        parts = name.split(".")
        if len(parts) > 3 and parts[1] == "layers" and int(parts[2]) in consumers and parts[4] in ("k_proj", "v_proj"):
            continue
        sd[name] = value.detach().to("cpu", getattr(torch, dtype)).contiguous().clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _save_state(path: Path, **state) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save leaves the previous state intact


def train(model_dir: str | Path, out: str | Path, text: str, *, layer_types: str | None = None, steps: int = 100,
          batch: int = 8, seq_len: int = 128, lr: float = 1e-3, warmup: int = 10, route_prob: float = 0.0,
          route_rule: str = "uniform", seed: int = 0, eval_every: int = 0, held_out_text: str | None = None,
          save_every: int = 0, resume: bool = False, stop_after: int | None = None, device: str | None = None,
          save_dtype: str = "float32", progress: bool = True) -> dict:
    """Train (or fine-tune) `model_dir` on `text` and save the checkpoint to `out`.

    Held-out loss: on `held_out_text` if given, else on the last 10 % of `text` (then not trained on).
    `layer_types` replaces the checkpoint's plan (e.g. an identity checkpoint trained into LCKV w2); `route_prob`
    > 0 trains with random cross-layer routing drawn by `route_rule` (`sample_routing`; the checkpoint's plan must
    be the identity).  `save_every` N writes
    `out/train_state.pt` (weights, AdamW state, step, RNG states, history) every N steps; `resume` continues from it
    with the same hyperparameters; `stop_after` N ends this run after N steps (state and checkpoint saved: for
    time-limited machines, continue with `resume`).  `device`: "cpu", "cuda", ... (default: cuda when present).
    `save_dtype`: the checkpoint's weight dtype (training is float32; bfloat16/float16 halve the file)."""
    import time

    from transformers import AutoTokenizer

    from .. import register

    register()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # routing draws from a generator of its own, so a routed run trains on exactly the windows an unrouted run with
    # the same seed sees (comparisons at equal tokens)
    route_rng = random.Random(f"routing-{seed}")
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    plan = LayerPlan.parse(layer_types or cfg["layer_types"], cfg["num_hidden_layers"],
                           forward_passes=cfg.get("forward_passes", 7), backward_passes=cfg.get("backward_passes", 2),
                           force_nodiag=cfg.get("force_nodiag", False), sliding_window=cfg.get("sliding_window"))
    if route_prob > 0 and not plan.is_identity:
        raise ValueError("--route-prob: random routing trains an identity-plan model (every layer keeps its k/v)")
    if save_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--save-dtype: {save_dtype!r} is not float32, bfloat16 or float16")
    if not 0 <= route_prob <= 1:
        raise ValueError(f"--route-prob: {route_prob} is not a probability")
    if route_rule not in ROUTE_RULES:
        raise ValueError(f"--route-rule: {route_rule!r} is not one of {', '.join(ROUTE_RULES)}")
    model = TrainableLCKV(model_dir, plan).to(device)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor(tok.encode(text))
    if held_out_text is None:
        split = int(len(ids) * 0.9)
        train_ids, held = ids[:split], ids[split:]
    else:
        train_ids, held = ids, torch.tensor(tok.encode(held_out_text))
    if len(train_ids) <= seq_len or len(held) <= seq_len:
        raise ValueError(f"text: {len(train_ids)} training / {len(held)} held-out tokens; each must exceed "
                         f"--seq-len {seq_len}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    hparams = {"layer_types": plan.layer_types, "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr,
               "warmup": warmup, "route_prob": route_prob, "route_rule": route_rule, "seed": seed}
    history: list[dict] = []
    first = 0
    Path(out).mkdir(parents=True, exist_ok=True)
    state_path = Path(out) / STATE_FILE
    if resume:
        if not state_path.exists():
            raise ValueError(f"--resume: {state_path} does not exist (train with --save-every first)")
        # on the CPU: the RNG state must stay a CPU tensor; load_state_dict moves weights and AdamW moments to `device`
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        was = {"route_rule": "uniform", **state["hparams"]}  # states written before the rule existed were uniform
        bad = [f for f in RESUME_FIELDS if was[f] != hparams[f]]
        if bad:
            raise ValueError("--resume: " + ", ".join(f"{f} was {was[f]!r}, now {hparams[f]!r}" for f in bad))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        if "route_rng" in state:
            route_rng.setstate(state["route_rng"])
        torch.set_rng_state(state["torch_rng"])
        first, history = state["step"], state["history"]
    windows = held[: (len(held) // seq_len) * seq_len].view(-1, seq_len)[:8].to(device)

    def held_out_loss() -> float:
        with torch.no_grad():
            logits = model(windows)
            return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))

    def save_state(step: int) -> None:
        _save_state(state_path, step=step, hparams=hparams, model=model.state_dict(), opt=opt.state_dict(),
                    rng=rng.getstate(), route_rng=route_rng.getstate(), torch_rng=torch.get_rng_state(),
                    history=history)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=first, desc="train", unit="step")
    t0 = time.perf_counter()
    last = steps if stop_after is None else min(steps, first + stop_after)
    for step in range(first, last):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup, lr)
        starts = [rng.randrange(len(train_ids) - seq_len) for _ in range(batch)]
        tokens = torch.stack([train_ids[s:s + seq_len] for s in starts]).to(device)
        routing = (sample_routing(plan.num_layers, route_prob, route_rng, route_rule) if route_prob > 0
                   else None)
        loss = train_step(model, opt, tokens, routing)
        entry = {"step": step + 1, "loss": loss}
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            entry["held_out_loss"] = held_out_loss()
        history.append(entry)
        if save_every and ((step + 1) % save_every == 0 or step + 1 == last):
            save_state(step + 1)
        if bar is not None:
            bar.update(1)
            done = (step + 1 - first) * batch * seq_len
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{done / (time.perf_counter() - t0):.0f}")
            if "held_out_loss" in entry:  # a line per evaluation stays on screen above the bar
                bar.write(f"step {step + 1}: train loss {loss:.4f}, held-out loss {entry['held_out_loss']:.4f} "
                          f"(perplexity {math.exp(entry['held_out_loss']):.2f})")
    if bar is not None:
        bar.close()
    if save_every == 0 and last < steps:  # stopping early without state would lose the run
        save_state(last)
    seconds = time.perf_counter() - t0
    save_checkpoint(model, model_dir, out, save_dtype)
    report = dict(hparams, history=history, held_out_loss=held_out_loss(), held_out_tokens=int(windows.numel()),
                  train_tokens=int(len(train_ids)), device=device, seconds_this_run=round(seconds, 1),
                  tokens_per_s=round((last - first) * batch * seq_len / max(seconds, 1e-9), 1),
                  resumed_from_step=first, completed_steps=last)
    (Path(out) / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
