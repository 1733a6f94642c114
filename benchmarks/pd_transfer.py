"""Prefill/decode disaggregation: bytes moved per prompt token, save/load time and TTFT, producers only vs all layers.

Models (bench shape: 12 layers, hidden 256, 8 KV heads of 32, fp32, random weights: bytes and times do not depend on
training), all from the same seeded identity checkpoint:
  identity   `0_1_..._11` (12 producers)          cla   CLA-2 `0_0_2_2_...` (6 producers)
  lckv-w2    `0_10_..._10_11` (3 producers)        llama the identity weights as vLLM's own Llama, moved by vLLM's
                                                         own ExampleConnector (every layer)
For each, engines one after another in this process (the connector is process-global): a prefill engine
(`kv_producer`) encodes `--requests` prompts of `--prompt` random tokens one at a time (max_tokens 1) and saves
their KV to a fresh folder; a decode engine (`kv_consumer`) loads each and produces its first token (TTFT of the
decode side) and `--gen` tokens; a plain engine without connector does the same from scratch (single instance).
Reported: bytes on disk per transferred token, the connector's save and load time (plugin models), prefill-side
time, decode-side TTFT, P/D TTFT (prefill + decode side, what a client doing both in turn sees) vs single-instance
TTFT, and whether the decode engine's greedy tokens equal the single instance's (acyclic plans: they must).

    .venv/bin/python -m benchmarks.pd_transfer [--requests 6] [--prompt 500] [--gen 16]
        -> benchmarks/results/pd_transfer.json
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, script_env, write_results

script_env(force_in_process=True)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "models" / "pd"
BLOCK = 32  # vLLM's CPU attention (the Llama baseline) wants a multiple of 32


def engine(path: Path, role: str | None, storage: Path, plugin: bool):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw = {}
    if role is not None:
        cfg = dict(kv_connector="LCKVStorageConnector" if plugin else "ExampleConnector", kv_role=role,
                   kv_connector_extra_config={"shared_storage_path": str(storage)})
        if plugin:
            cfg["kv_connector_module_path"] = "lckv_vllm.engine.connector"
        kw["kv_transfer_config"] = KVTransferConfig(**cfg)
    return LLM(str(path), dtype="float32", kv_cache_memory_bytes=128 << 20, max_model_len=1024, seed=0,
               block_size=BLOCK, max_num_seqs=4, enforce_eager=True, enable_prefix_caching=False, **kw)


def timed(llm, prompts, max_tokens):
    """Per prompt, one at a time: (wall seconds, greedy tokens)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = []
    for p in prompts:
        t = time.perf_counter()
        o = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
        out.append((time.perf_counter() - t, list(o.outputs[0].token_ids)))
    return out


def stats():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return dict(getattr(get_kv_transfer_group(), "stats", {}))


def close():
    """After the caller dropped its engine: free it before the next one is built (a late free tears down the
    distributed state the next engine set up), and drop the process-global connector."""
    from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown

    gc.collect()
    ensure_kv_transfer_shutdown()


def measure(name: str, path: Path, plugin: bool, prompts, args) -> dict:
    storage = WORK / "kv" / name
    shutil.rmtree(storage, ignore_errors=True)
    warm = [list(range(3, 43))]
    llm = engine(path, "kv_producer", storage, plugin)
    timed(llm, warm, 1)
    prefill = timed(llm, prompts, 1)
    saved = stats()
    del llm
    close()
    files = [f for d in storage.iterdir() if d.is_dir() for f in d.iterdir()]
    layers = sorted({f.stem for f in files})
    transferred = sum((len(p) - 1) // BLOCK * BLOCK for p in warm + prompts)
    llm = engine(path, "kv_consumer", storage, plugin)
    timed(llm, warm, 1)
    first = timed(llm, prompts, 1)
    decoded = timed(llm, prompts, args.gen)
    loaded = stats()
    del llm
    close()
    llm = engine(path, None, storage, plugin)
    timed(llm, warm, 1)
    single = timed(llm, prompts, 1)
    single_gen = timed(llm, prompts, args.gen)
    del llm
    close()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    r = {"layers_saved": len(layers), "bytes_per_token": round(sum(f.stat().st_size for f in files) / transferred, 1),
         "prefill_side_ms": round(1e3 * med([t for t, _ in prefill]), 2),
         "decode_side_ttft_ms": round(1e3 * med([t for t, _ in first]), 2),
         "single_ttft_ms": round(1e3 * med([t for t, _ in single]), 2),
         "outputs_equal_single": [toks for _, toks in decoded] == [toks for _, toks in single_gen]}
    r["pd_ttft_ms"] = round(r["prefill_side_ms"] + r["decode_side_ttft_ms"], 2)
    r["pd_over_single_ttft"] = round(r["pd_ttft_ms"] / r["single_ttft_ms"], 2)
    if plugin:
        n = len(warm) + len(prompts)
        r["save_ms_per_prompt"] = round(1e3 * saved["save_s"] / n, 2)
        r["load_ms_per_prompt"] = round(1e3 * loaded["load_s"] / n, 2)
        r["connector_bytes_per_token"] = round(saved["saved_bytes"] / transferred, 1)
    print(name, r, flush=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=500)
    ap.add_argument("--gen", type=int, default=16)
    args = ap.parse_args()

    import random

    from lckv_vllm.plan import pattern
    from lckv_vllm.tools.checkpoint import export_llama, make_preset
    from lckv_vllm.tools.harness import machine

    models = {"identity": pattern("identity", 12), "cla": pattern("cla", 12), "lckv-w2": pattern("w2", 12)}
    paths = {n: make_preset("bench-identity", WORK / n, layer_types=lt) for n, lt in models.items()}
    llama = WORK / "llama"
    if not (llama / "config.json").exists():
        export_llama(paths["identity"], llama)
    rnd = random.Random(0)
    prompts = [[rnd.randrange(3, 32000) for _ in range(args.prompt)] for _ in range(args.requests)]
    result = {"command": command_line("benchmarks.pd_transfer"), "machine": machine(),
              "args": vars(args), "block_size": BLOCK, "models": {}}
    for name, path in [*paths.items(), ("llama", llama)]:
        result["models"][name] = measure(name, path, name != "llama", prompts, args)
        result["models"][name]["layer_types"] = models.get(name, "LlamaForCausalLM")
    base = result["models"]["identity"]["bytes_per_token"]
    for r in result["models"].values():
        r["bytes_vs_identity"] = round(r["bytes_per_token"] / base, 4)
    write_results(HERE / "results" / "pd_transfer.json", result, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
