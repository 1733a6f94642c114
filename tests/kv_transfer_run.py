"""Run KV-transfer engines (prefill or decode role) one after another in a process of their own.

    python tests/kv_transfer_run.py JOBS.json    -> prints one JSON line: a result per job

vLLM keeps one KV connector per process and tears the distributed state down when an engine is deleted, so engines
with connectors cannot share the test session's process with its cached engines.  Each job: {"path", "role",
"storage", "prompts", "max_tokens", "hf_overrides"?, "kv_cache_dtype"?, "block_size"?}; its result: the outputs (tokens, logprobs), the connector
statistics of the worker side and of the scheduler side, or the error the engine refused with.
"""

from __future__ import annotations

import gc
import json
import sys
import time

from lckv_vllm.tools.harness import script_env  # noqa: E402 - before vLLM loads

script_env()


def run_job(job: dict) -> dict:
    from vllm import LLM
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import ensure_kv_transfer_shutdown, get_kv_transfer_group

    from conftest import generate

    cfg = KVTransferConfig(kv_connector="LCKVStorageConnector", kv_connector_module_path="lckv_vllm.engine.connector",
                           kv_role=job["role"], kv_connector_extra_config={"shared_storage_path": job["storage"]})
    llm = None
    try:
        llm = LLM(job["path"], dtype="float32", kv_cache_memory_bytes=32 << 20, max_model_len=256, seed=0,
                  block_size=job.get("block_size", 16), max_num_seqs=8, enforce_eager=True,
                  enable_prefix_caching=False, kv_transfer_config=cfg, hf_overrides=job.get("hf_overrides") or {},
                  kv_cache_dtype=job.get("kv_cache_dtype", "auto"))
    except Exception as e:  # a refused set-up: the message is the result
        gc.collect()
        ensure_kv_transfer_shutdown()
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        t = time.perf_counter()
        outs = generate(llm, job["prompts"], max_tokens=job["max_tokens"])
        wall = time.perf_counter() - t
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        return {"outputs": [[toks, lps] for toks, lps, _ in outs], "wall_s": wall,
                "worker": dict(get_kv_transfer_group().stats), "scheduler": dict(sched.connector.stats)}
    finally:
        del llm
        gc.collect()
        ensure_kv_transfer_shutdown()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    print(json.dumps([run_job(job) for job in jobs]))
