"""The plugin's switches, resolved once into one frozen `Settings` object.

Four switches exist, each an environment variable with a config-field twin (so `--hf-overrides` can set it too):

* `LCKV_ATTENTION_IMPL` = auto | cpu | torch | triton: who does the attention math (`attention/select.py`);
* `LCKV_EXACT_RECOMPUTE` (config `lckv_exact_recompute`, default on): exact re-encoding after preemption for cyclic
  plans (`resume.py`);
* `LCKV_CHUNKED_PREFILL` (config `lckv_chunked_prefill`, default off): let cyclic plans use chunked prefill and prefix
  caching, with chunk-by-chunk semantics (`vllm_patches.py`, item 1);
* `LCKV_PASS_ECONOMY` (config `lckv_pass_economy`, default on): passes after the first of an iterative prefill run
  only over rows that can still change (`model.LCKVModel._iterate`); off runs every pass over every row, the same
  result at a higher cost: kept to measure the economy and as a fallback.

Why one place: the model reads the settings when vLLM builds it and keeps them for the engine's life, so two engines
in one process may differ and no step ever reads the environment.  The environment wins over the config field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ATTENTION_IMPL_ENV = "LCKV_ATTENTION_IMPL"
EXACT_RECOMPUTE_ENV = "LCKV_EXACT_RECOMPUTE"
CHUNKED_PREFILL_ENV = "LCKV_CHUNKED_PREFILL"
PASS_ECONOMY_ENV = "LCKV_PASS_ECONOMY"

ATTENTION_IMPLS = ("auto", "cpu", "torch", "triton")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; "auto" is resolved per device by attention/select.py
    exact_recompute: bool = True
    chunked_prefill: bool = False
    pass_economy: bool = True


def _flag(environ: Mapping[str, str], name: str) -> bool | None:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")


def attention_impl_choice(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    choice = environ.get(ATTENTION_IMPL_ENV, "auto").strip().lower() or "auto"
    if choice not in ATTENTION_IMPLS:
        raise ValueError(f"{ATTENTION_IMPL_ENV}={choice!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    return choice


def _switch(environ: Mapping[str, str], name: str, hf_config, field: str, default: bool) -> bool:
    value = _flag(environ, name)
    return bool(getattr(hf_config, field, default)) if value is None else value


def load_settings(hf_config=None, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings for one engine: the environment, then the config's `lckv_*` fields, then the defaults."""
    environ = os.environ if environ is None else environ
    return Settings(
        attention_impl=attention_impl_choice(environ),
        exact_recompute=_switch(environ, EXACT_RECOMPUTE_ENV, hf_config, "lckv_exact_recompute", True),
        chunked_prefill=_switch(environ, CHUNKED_PREFILL_ENV, hf_config, "lckv_chunked_prefill", False),
        pass_economy=_switch(environ, PASS_ECONOMY_ENV, hf_config, "lckv_pass_economy", True),
    )
