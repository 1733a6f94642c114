"""Run one tiny preset with tensor/pipeline parallelism in its own process and compare it with the reference.

    python tests/parallel_run.py PRESET OUT_DIR --tp N --pp N     -> prints one JSON line

A separate process per engine: vLLM's multi-worker executor spawns worker processes that stay alive with the engine,
and the test session should not keep them.  The thread binding is left to the plugin (it splits the allowed cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lckv_vllm.tools.harness import script_env  # noqa: E402 - before vLLM loads

script_env()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from conftest import generate, random_prompt

    from lckv_vllm.tools.checkpoint import make_preset
    from lckv_vllm.reference_model import ReferenceModel

    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()

    from vllm import LLM

    path = make_preset(args.preset, os.path.join(args.out, args.preset))
    t = time.time()
    llm = LLM(str(path), dtype="float32", max_model_len=512, seed=0, block_size=16, max_num_seqs=16,
              enforce_eager=True, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    startup = time.time() - t
    prompts = [random_prompt(n, seed=10 + n) for n in (1, 5, 9, 30, 70)]
    results = generate(llm, prompts, max_tokens=16)
    ref = ReferenceModel(path)
    same, worst = True, 0.0
    for (toks, lps, _), p in zip(results, prompts):
        rtoks, rlps = ref.generate(p, 16)
        same &= toks == rtoks
        worst = max([worst] + [abs(a - b) for a, b in zip(lps, rlps)])
    cfg = llm.llm_engine.vllm_config.cache_config
    print(json.dumps({"preset": args.preset, "tp": args.tp, "pp": args.pp, "same_tokens": same,
                      "max_dlogprob": worst, "startup_s": startup, "total_s": time.time() - t,
                      "kv_capacity_tokens": cfg.num_gpu_blocks * cfg.block_size,
                      "thread_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND")}))
    sys.stdout.flush()
    os._exit(0)  # skip the multi-worker teardown (seconds of waiting for worker processes)
