"""Choosing a sharing pattern at deploy time: candidate patterns, their KV footprint at a budget, and perplexity
measured through vLLM with each pattern applied as an override (`lckv-vllm plan --budget-gib`, `lckv-vllm quality`).

A checkpoint can be served with any pattern whose producers have k/v weights in it (for an identity or randomly
routed checkpoint: any pattern).  Serving it with a pattern it was not trained for trades quality for KV memory;
`quality` measures the trade on held-out text, `plan` turns a memory budget into the patterns that fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..plan import LayerPlan, plan_from_config


@dataclass(frozen=True)
class Candidate:
    name: str
    layer_types: str

    def plan(self, config: dict) -> LayerPlan:
        return plan_from_config(_namespace(dict(config, layer_types=self.layer_types)))


def _namespace(cfg: dict):
    import argparse

    return argparse.Namespace(**cfg)


def load_config(model: str | Path) -> dict:
    path = Path(model) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model}: no config.json (expected a checkpoint directory)")
    return json.loads(path.read_text())


def kv_shape(config: dict) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of a checkpoint config."""
    heads = config["num_attention_heads"]
    return config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads


def dtype_bytes(config: dict, dtype: str | None = None) -> int:
    name = (dtype or config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
    sizes = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
             "float8": 1}
    if name not in sizes:
        raise ValueError(f"dtype: {name!r} is not one of {', '.join(sizes)}")
    return sizes[name]


def candidates(config: dict) -> list[Candidate]:
    """The checkpoint's own pattern, identity, CLA-2/3/4 (every k-th layer keeps its KV and the layers between read
    the nearest producer below) and a YOCO-like pattern (the upper half reads the middle layer); only those whose
    producers have k/v weights in the checkpoint (are producers of its own plan)."""
    own = plan_from_config(_namespace(config))
    L = own.num_layers
    half = L // 2
    out = [Candidate("checkpoint", own.layer_types), Candidate("identity", "_".join(map(str, range(L))))]
    for k in (2, 3, 4):
        if k < L:
            out.append(Candidate(f"cla-{k}", "_".join(str(i - i % k) for i in range(L))))
    if L >= 4:
        out.append(Candidate("yoco-like", "_".join([str(i) for i in range(half)] + [str(half - 1)] * (L - half))))
    have = set(own.producers)
    seen, usable = set(), []
    for c in out:
        if c.layer_types in seen:
            continue
        seen.add(c.layer_types)
        if set(LayerPlan.parse(c.layer_types, L).producers) <= have:
            usable.append(c)
    return usable


def footprint(config: dict, cand: Candidate, budget_bytes: int, context: int, block_size: int,
              nbytes: int) -> dict:
    plan = cand.plan(config)
    kv_heads, head_dim = kv_shape(config)
    per_token = plan.kv_bytes_per_token(kv_heads, head_dim, nbytes)
    blocks = budget_bytes // (per_token * block_size)  # vLLM hands out whole blocks
    return {"name": cand.name, "layer_types": cand.layer_types, "producers": len(plan.producers),
            "kv_bytes_per_token": per_token, "capacity_tokens": blocks * block_size,
            "sequences": blocks // math.ceil(context / block_size)}


def recommend(rows: list[dict], concurrency: int) -> dict | None:
    """The lowest-perplexity pattern that fits `concurrency` sequences; without perplexities, the smallest KV
    footprint that fits (the most headroom)."""
    fitting = [r for r in rows if r["sequences"] >= concurrency]
    if not fitting:
        return None
    if all(r.get("perplexity") is not None for r in fitting):
        return min(fitting, key=lambda r: (r["perplexity"], r["kv_bytes_per_token"]))
    return min(fitting, key=lambda r: r["kv_bytes_per_token"])


def overrides_argument(layer_types: str) -> str:
    return "--hf-overrides '" + json.dumps({"layer_types": layer_types}) + "'"


# ---- perplexity through vLLM ---------------------------------------------------------------------------------------
def text_windows(model: str | Path, text: str, max_tokens: int, window: int) -> list[list[int]]:
    """The first `max_tokens` tokens of `text` (model's tokenizer, BOS first) cut into windows of `window` tokens;
    each window is scored as one prompt."""
    from transformers import AutoTokenizer

    from .. import register

    register()  # the tokenizer loader reads config.json: it must know model_type "lckv-llama"
    ids = AutoTokenizer.from_pretrained(str(model)).encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]


def prompt_nll(llm, windows: list[list[int]]) -> tuple[float, int]:
    """Sum of -log p(token | earlier tokens of its window) over every window token but the first, and the count."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=False)
    total, count = 0.0, 0
    for out, w in zip(outs, windows):
        for tok, lp in zip(w[1:], out.prompt_logprobs[1:]):
            total -= lp[tok].logprob
            count += 1
    return total, count


def perplexities(model: str | Path, patterns: list[str | None], text: str, *, max_tokens: int = 2048,
                 window: int = 512, dtype: str = "float32", kv_bytes: int = 256 << 20, engine_kwargs=None,
                 progress=print, kv_cache_dtype: str = "auto") -> list[dict]:
    """Perplexity of `text` under each pattern (None: the checkpoint's own), each served by a vLLM engine with the
    pattern applied as `hf_overrides`.  Engines stay alive until the end (vLLM tears down process-wide state when
    one is destroyed).  Each window is encoded the way the model defines it, whole and with m+b passes (tolerance
    0), so patterns are compared on the model alone; what the serving defaults (adaptive passes, chunked prefill)
    change is measured by benchmarks/convergence.py.  `kv_cache_dtype`: the pages' dtype (`fp8`, `fp8_e5m2`:
    docs/semantics.md, section 6)."""
    from vllm import LLM

    config = load_config(model)
    windows = text_windows(model, text, max_tokens, window)
    kv_heads, head_dim = kv_shape(config)
    nbytes = dtype_bytes(config, dtype if kv_cache_dtype == "auto" else kv_cache_dtype)
    engines, rows = [], []
    for lt in patterns:
        kw = dict(dtype=dtype, max_model_len=max(len(w) for w in windows) + 1, kv_cache_memory_bytes=kv_bytes,
                  enable_prefix_caching=False, enforce_eager=True, seed=0, kv_cache_dtype=kv_cache_dtype)
        kw.update(engine_kwargs or {})
        exact = {"lckv_prefill_tol": 0.0, "lckv_chunked_prefill": False}
        kw["hf_overrides"] = {**exact, **({"layer_types": lt} if lt is not None else {}),
                              **kw.get("hf_overrides", {})}
        llm = LLM(str(model), **kw)
        engines.append(llm)
        plan = llm.llm_engine.vllm_config.model_config.hf_config.plan
        nll, n = prompt_nll(llm, windows)
        row = {"layer_types": plan.layer_types, "kv_cache_dtype": kv_cache_dtype, "producers": len(plan.producers),
               "kv_bytes_per_token": plan.kv_bytes_per_token(kv_heads, head_dim, nbytes),
               "tokens_scored": n, "perplexity": math.exp(nll / n)}
        progress(f"{row['layer_types']}: perplexity {row['perplexity']:.4f} over {n} tokens, "
                 f"{row['kv_bytes_per_token']} KV bytes/token")
        rows.append(row)
    return rows
