"""`temporary_env`: environment variables set only while an engine is built.

The plugin reads its switches (`LCKV_ATTENTION_IMPL`, `LCKV_EXACT_RECOMPUTE`, `LCKV_CHUNKED_PREFILL`) when vLLM
builds the model and keeps what it read for the engine's life, so scripts and tests that hold several engines in
one process set the switches around each `LLM(...)` and restore the environment afterwards.  vLLM caches its own
`VLLM_*` variables once an engine has started (`vllm.envs.enable_envs_cache`), so setting one of those also drops
that cache, before the engine is built and after.
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def temporary_env(env: dict | None):
    saved = {k: os.environ.get(k) for k in env or {}}
    vllm_vars = any(k.startswith("VLLM_") for k in saved)
    os.environ.update(env or {})
    if vllm_vars:
        _drop_vllm_env_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if vllm_vars:
            _drop_vllm_env_cache()


def _drop_vllm_env_cache() -> None:
    import vllm.envs

    vllm.envs.disable_envs_cache()
