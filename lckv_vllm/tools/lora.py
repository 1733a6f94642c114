"""LoRA adapters in PEFT format for LCKV checkpoints: seeded random ones (the tests' adapters) and merging one into a
checkpoint's weights (the reference a served adapter must equal).

An adapter is `adapter_config.json` (`r`, `lora_alpha`, `target_modules`) and `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] per adapted module; the adapted
weight is W + (lora_alpha / r) * B @ A, as PEFT and vLLM apply it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."


def _shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}


def make_adapter(checkpoint: str | Path, out: str | Path, seed: int, r: int = 8, alpha: int = 16,
                 targets: tuple[str, ...] = ALL_TARGETS, scale: float = 0.1) -> Path:
    """A random adapter for every layer of `checkpoint` (k/v included, whatever the plan: a PEFT adapter trained on
    the plain model has them).  With the default `scale` (std of B) the deltas are about half the size of a seeded
    checkpoint's weights: enough to change greedy tokens."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, (n_out, n_in) in _shapes(cfg).items():
            if name.split(".")[-1] not in targets:
                continue
            key = f"{_PREFIX}model.layers.{i}.{name}"
            sd[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) / n_in ** 0.5
            sd[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * scale
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", "target_modules": list(targets)}, indent=1))
    return out


def merge_adapter(checkpoint: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """`checkpoint` with `adapter` merged into its weights: W + (alpha / r) B A for every adapted weight the checkpoint
    has (an adapter's k/v for a layer saved without k/v projections has nothing to merge into)."""
    from safetensors.torch import load_file, save_file

    checkpoint, adapter, out = Path(checkpoint), Path(adapter), Path(out)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = load_file(str(checkpoint / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for key, a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(_PREFIX):-len(".lora_A.weight")] + ".weight"
        if name in weights:
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            w = weights[name]
            weights[name] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
