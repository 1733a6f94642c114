"""Greedy generation with speculative decoding (ngram, or a draft model) in a process of its own; prints one JSON
line.

    python tests/spec_run.py MODEL_DIR PROMPTS_JSON MAX_TOKENS [--overrides JSON] [--draft DIR]
    (environment: LCKV_* switches)

Why a process per engine: in vLLM 0.32 on CPU, the ngram proposer imports numba, whose llvmlite binding holds an
object that answers every attribute lookup; the next engine built in that process scans every loaded module for
Triton kernels to override (`vllm.triton_utils.dispatcher._rebind_kernels`), trips over that object and fails.
So after one speculative engine, no further engine starts in the same process (vLLM's own Llama included).
"""

from __future__ import annotations

import json
import os
import sys

from lckv_vllm.tools.harness import script_env  # noqa: E402 - before vLLM loads

script_env()

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}

if __name__ == "__main__":
    from conftest import BLOCK_SIZE, MAX_MODEL_LEN, generate, model_of

    from vllm import LLM

    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("max_tokens", type=int)
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--draft")
    args = ap.parse_args()
    model, prompts, max_tokens = args.model, json.loads(open(args.prompts).read()), args.max_tokens
    spec = NGRAM if args.draft is None else {"method": "draft_model", "model": args.draft, "num_speculative_tokens": 3}
    llm = LLM(model, dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=MAX_MODEL_LEN, seed=0,
              block_size=BLOCK_SIZE, max_num_seqs=16, enforce_eager=True, speculative_config=spec,
              disable_log_stats=False, hf_overrides=json.loads(args.overrides) or None)
    results = generate(llm, prompts, max_tokens)
    accepted = sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    model = model_of(llm).model
    prefill = dict(model.prefill.stats.snapshot(), layer_types=model.plan.layer_types)
    print("@@" + json.dumps({"results": results, "accepted": accepted, "prefill": prefill}))
    sys.stdout.flush()
    os._exit(0)
