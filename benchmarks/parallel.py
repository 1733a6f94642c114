"""Tensor and pipeline parallelism against one rank on this machine: KV capacity and offline throughput.

Each configuration runs in its own process (`tests/parallel_run.py`-style: vLLM's multi-worker executor keeps its
worker processes for the engine's life): the bench-shape w2 and CLA-2 checkpoints (12 layers, hidden 256), one
rank, TP=2 and PP=2, the same KV budget per worker (VLLM_CPU_KVCACHE_SPACE=1 GiB), batch 16 prompts of 16 tokens,
64 new tokens (ignore_eos), eager, fp32.  The plugin binds one core to each worker.  On a 2-core CPU, parallelism
cannot speed anything up (the two workers share the two cores a single rank already uses, and add communication):
the numbers show what runs and what the capacity becomes, not a GPU speed-up.

    .venv/bin/python -m benchmarks.parallel     -> benchmarks/results/parallel.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, write_results

HERE = Path(__file__).resolve().parent
CONFIGS = [("bench-w2", 1, 1), ("bench-w2", 2, 1), ("bench-w2", 1, 2), ("bench-cla", 1, 1), ("bench-cla", 2, 1),
           ("bench-cla", 1, 2)]


def child(path: str, tp: int, pp: int) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.time()
    llm = LLM(path, dtype="float32", max_model_len=512, seed=0, block_size=16, max_num_seqs=16, enforce_eager=True,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    startup = time.time() - t
    rnd = random.Random(0)
    batch = [TokensPrompt(prompt_token_ids=[rnd.randrange(3, 32000) for _ in range(16)]) for _ in range(16)]
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    llm.generate(batch, sp, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    cc = llm.llm_engine.vllm_config.cache_config
    print(json.dumps({"tp": tp, "pp": pp, "startup_s": round(startup, 1), "output_tok_s": rates,
                      "kv_capacity_tokens": cc.num_gpu_blocks * cc.block_size,
                      "first_tokens": list(outs[0].outputs[0].token_ids[:8]),
                      "thread_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}), flush=True)
    os._exit(0)


def main() -> int:
    import statistics

    from lckv_vllm.tools.harness import machine

    from lckv_vllm.tools.checkpoint import ModelSpec, make_model, make_preset
    from lckv_vllm.plan import pattern

    work = HERE.parent / "models" / "bench"
    paths = {"bench-w2": make_preset("bench-w2", work / "bench-w2")}
    cla = work / "bench-cla"
    if not (cla / "config.json").exists():
        make_model(ModelSpec(layer_types=pattern("cla", 12), num_layers=12, hidden_size=256, num_heads=8,
                             num_kv_heads=8), cla)
    paths["bench-cla"] = cla
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="ERROR",
               VLLM_CPU_KVCACHE_SPACE="1")
    rows = []
    for name, tp, pp in CONFIGS:
        r = subprocess.run([sys.executable, __file__, "--child", str(paths[name]), str(tp), str(pp)], env=env,
                           capture_output=True, text=True, timeout=900)
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode != 0 or not line:
            print(r.stderr[-3000:], file=sys.stderr)
            rows.append({"model": name, "tp": tp, "pp": pp, "error": r.stderr[-500:]})
            continue
        row = {"model": name, **json.loads(line[-1])}
        row["output_tok_s_median"] = statistics.median(row["output_tok_s"])
        rows.append(row)
        print(f"{name} tp={tp} pp={pp}: {row['output_tok_s_median']:.0f} tok/s, KV capacity "
              f"{row['kv_capacity_tokens']} tokens, start-up {row['startup_s']} s", flush=True)
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["tp"] == 1 and r["pp"] == 1)
        if "error" not in row and "error" not in base:
            row["throughput_vs_one_rank"] = row["output_tok_s_median"] / base["output_tok_s_median"]
            row["capacity_vs_one_rank"] = row["kv_capacity_tokens"] / base["kv_capacity_tokens"]
            row["same_first_tokens_as_one_rank"] = row["first_tokens"] == base["first_tokens"]
    report = {"benchmark": "TP=2 / PP=2 against one rank: KV capacity and offline throughput",
              "command": command_line("benchmarks.parallel"), "machine": machine(),
              "settings": {"dtype": "float32", "kv_budget_per_worker": "VLLM_CPU_KVCACHE_SPACE=1 (GiB)",
                           "batch": 16, "prompt_len": 16, "output_len": 64, "block_size": 16, "eager": True,
                           "rounds": 3},
              "rows": rows}
    write_results(HERE / "results" / "parallel.json", report, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    sys.exit(main())
