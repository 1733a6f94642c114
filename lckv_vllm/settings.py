"""The plugin's switches, resolved once into one frozen `Settings` object.

Eight switches exist, each an environment variable with a config-field twin (so `--hf-overrides` can set it too):

* `LCKV_ATTENTION_IMPL` = auto | cpu | torch | triton: who does the attention math (`attention/chooser.py`);
* `LCKV_EXACT_RECOMPUTE` (config `lckv_exact_recompute`, default on): after preemption, cyclic plans re-encode the
  prompt part as a prefill and the generated tokens one by one, as they were first encoded (`resume.py`);
* `LCKV_CHUNKED_PREFILL` (config `lckv_chunked_prefill`, default on): cyclic plans use chunked prefill and prefix
  caching, each chunk encoded iteratively on top of the earlier, final ones; off forces whole-prompt prefill
  (`engine/startup.py`);
* `LCKV_PREFILL_TOL` (config `lckv_prefill_tol`, default `DEFAULT_PREFILL_TOL`): adaptive passes: a sequence stops
  iterating once its producer K/V moved by less than this (relative) in a pass; 0 = always m+b passes
  (`prefill.py`);
* `LCKV_PREFILL_BLOCK` (config `lckv_prefill_block`, default `DEFAULT_PREFILL_BLOCK`): with chunked prefill on, a
  cyclic segment encodes each step's new tokens in blocks of this many positions, aligned to multiples of it from
  the sequence start, each iterated on top of the earlier, final ones (`prefill.py`); 0 = the step's tokens as one
  block.  Smaller blocks converge in fewer passes (docs/prefill.md);
* `LCKV_WINDOWED_PAGES` (config `lckv_windowed_pages`, default on): a producer whose every reader is sliding-window
  gets vLLM's sliding-window KV spec, so its pages older than the window are freed (`LayerPlan.page_window`); off
  keeps full pages for every producer (the window applied on read only);
* `LCKV_PASS_ECONOMY` (config `lckv_pass_economy`, default on): passes after the first of an iterative prefill run
  only over rows that can still change (`prefill.py`); off runs every pass over every row (and no adaptive stop),
  the m+b-pass result at a higher cost: kept to measure the economy and as a fallback;
* `LCKV_ALLOW_UNTESTED` (config `lckv_allow_untested`, default none): comma-separated keys of features the matrix
  marks untested (`engine/features.py`, docs/features.md) that the start-up guard should let through, with a
  warning, instead of refusing.

Why one place: the model reads the settings when vLLM builds it and keeps them for the engine's life, so two engines
in one process may differ and no step ever reads the environment.  The environment wins over the config field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

ATTENTION_IMPL_ENV = "LCKV_ATTENTION_IMPL"
EXACT_RECOMPUTE_ENV = "LCKV_EXACT_RECOMPUTE"
CHUNKED_PREFILL_ENV = "LCKV_CHUNKED_PREFILL"
PASS_ECONOMY_ENV = "LCKV_PASS_ECONOMY"
PREFILL_TOL_ENV = "LCKV_PREFILL_TOL"
WINDOWED_PAGES_ENV = "LCKV_WINDOWED_PAGES"

# Chosen by measurement on the trained Shakespeare models (docs/prefill.md, benchmarks/results/convergence.json):
# the loosest tolerance of the sweep whose held-out perplexity stays within 0.1 % of the m+b-pass value on every
# trained model under every split measured (whole prompts, prefill blocks, 16- to 128-token chunks); 0.2 reaches
# +0.13 % on the 6-layer model in 16-token chunks.
DEFAULT_PREFILL_TOL = 0.15
# Chosen by measurement on the trained deep model (docs/prefill.md, benchmarks/results/convergence.json and
# prefill_tax.json): smaller blocks converge in fewer passes (2.8 rows per token and pass at 64, 3.5 at 256, 4.0 as
# one block, 512-token windows) but each block is one more run of every layer, which on CPU costs more than it saves
# below ~256 tokens; 256 had the lowest prefill TTFT at 256-2048 tokens.  Sizes 16-512 all keep held-out perplexity
# within 0.1 % of the m+b-pass value under the default tolerance.
DEFAULT_PREFILL_BLOCK = 256
PREFILL_BLOCK_ENV = "LCKV_PREFILL_BLOCK"
ALLOW_UNTESTED_ENV = "LCKV_ALLOW_UNTESTED"

ATTENTION_IMPLS = ("auto", "cpu", "torch", "triton")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; "auto" is resolved per device by attention/chooser.py
    exact_recompute: bool = True
    chunked_prefill: bool = True
    pass_economy: bool = True
    prefill_tol: float = DEFAULT_PREFILL_TOL
    windowed_pages: bool = True
    prefill_block: int = DEFAULT_PREFILL_BLOCK
    allow_untested: tuple[str, ...] = ()  # feature keys of engine/features.py, checked there

    @property
    def block(self) -> int:
        """Positions per prefill block (0: none): blocks are the chunk-by-chunk semantics applied inside a step, so
        the whole-prompt mode (`chunked_prefill` off, the m+b-pass reproduction) never uses them."""
        return self.prefill_block if self.chunked_prefill else 0

    @property
    def adaptive(self) -> bool:
        """Whether prefill passes stop early per sequence (a tolerance, and the economy it builds on)."""
        return self.prefill_tol > 0 and self.pass_economy


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


def _number_setting(environ: Mapping[str, str], env: str, hf_config, field: str, default, convert, valid,
                    expected: str):
    """The environment variable if set, else the config field, else `default`; converted, checked, and on a bad
    value an error naming where it came from."""
    raw, source = environ.get(env), env
    if raw is None or not str(raw).strip():
        raw, source = getattr(hf_config, field, None), field
        if raw is None:
            return default
    try:
        value = None if isinstance(raw, bool) else convert(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{source}={raw!r}: expected {expected}")
    return value


def _int(raw) -> int | None:
    return None if isinstance(raw, float) else int(str(raw).strip())


def prefill_tol_choice(environ: Mapping[str, str], hf_config) -> float:
    return _number_setting(environ, PREFILL_TOL_ENV, hf_config, "lckv_prefill_tol", DEFAULT_PREFILL_TOL, float,
                           lambda v: math.isfinite(v) and v >= 0,
                           "a finite number >= 0 (0 = always m+b passes)")


def prefill_block_choice(environ: Mapping[str, str], hf_config) -> int:
    return _number_setting(environ, PREFILL_BLOCK_ENV, hf_config, "lckv_prefill_block", DEFAULT_PREFILL_BLOCK, _int,
                           lambda v: v >= 0, "an integer >= 0 (positions per prefill block; 0 = no blocks)")


def allow_untested_choice(environ: Mapping[str, str], hf_config) -> tuple[str, ...]:
    raw = environ.get(ALLOW_UNTESTED_ENV)
    if raw is None or not raw.strip():
        raw = getattr(hf_config, "lckv_allow_untested", None) or ""
    if isinstance(raw, (list, tuple)):
        raw = ",".join(str(x) for x in raw)
    return tuple(sorted({x.strip() for x in str(raw).split(",") if x.strip()}))


def load_settings(hf_config=None, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings for one engine: the environment, then the config's `lckv_*` fields, then the defaults."""
    environ = os.environ if environ is None else environ
    return Settings(
        attention_impl=attention_impl_choice(environ),
        exact_recompute=_switch(environ, EXACT_RECOMPUTE_ENV, hf_config, "lckv_exact_recompute", True),
        chunked_prefill=_switch(environ, CHUNKED_PREFILL_ENV, hf_config, "lckv_chunked_prefill", True),
        pass_economy=_switch(environ, PASS_ECONOMY_ENV, hf_config, "lckv_pass_economy", True),
        prefill_tol=prefill_tol_choice(environ, hf_config),
        windowed_pages=_switch(environ, WINDOWED_PAGES_ENV, hf_config, "lckv_windowed_pages", True),
        prefill_block=prefill_block_choice(environ, hf_config),
        allow_untested=allow_untested_choice(environ, hf_config),
    )
