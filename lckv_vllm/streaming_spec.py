"""StreamingLLM mode: what a producer keeps (attention sinks + a recent window) and where keys sit in the cache.

`lckv_streaming: {"sink_tokens": S, "window": W}` in the config (or `--hf-overrides`) turns it on for every producer
of the plan (docs/semantics.md, "Streaming"):

* a query at position t sees the sinks (positions < S) and the recent window (positions > t - W), intersected with
  what its layer may see at all (<= t, or < t when strictly causal); a query that sees nothing outputs 0;
* keys are stored without rotary embedding and rotated when read, at their position *in the cache* (pos-shift, as
  StreamingLLM and the official LCKV streaming code do): once t >= S + W - 1 the cache holds S sinks and W recent
  tokens, the query sits at cache position S + W - 1, a window key j at j - shift(t) and a sink j at j, with
  shift(t) = t - (S + W - 1).  Window distances stay t - j; sink distances are capped.  No rotary angle ever exceeds
  S + W - 1, so a stream can run past the trained context (`max_position_embeddings`).

Plain data and integer arithmetic, no torch: the plan, the config check, the reference and the engine's attention
read the same `Streaming` object.
"""

from __future__ import annotations

from dataclasses import dataclass

FIELD = "lckv_streaming"


class StreamingError(ValueError):
    """A `lckv_streaming` value (or a config field it depends on) that cannot be served."""


@dataclass(frozen=True)
class Streaming:
    sink_tokens: int  # S: the first S positions stay visible (and in the pages) forever
    window: int  # W: the most recent W positions (the query's own included) stay visible

    @property
    def span(self) -> int:
        """Cache positions in use once the stream is longer than sinks + window: 0 .. S + W - 1."""
        return self.sink_tokens + self.window

    def shift(self, t: int) -> int:
        """How far a query at position t (and the window keys it reads) is moved down for rotary embedding."""
        return max(0, t - (self.span - 1))

    def visible(self, t: int, j: int, strict: bool) -> bool:
        """Whether a query at position t reads the key at position j."""
        if j > t or (strict and j == t):
            return False
        return j < self.sink_tokens or j > t - self.window

    def kept_from(self, num_computed: int) -> int:
        """First non-sink position the next token (at `num_computed`) still reads: pages below it, above the
        sinks, can be freed."""
        return max(self.sink_tokens, num_computed - self.window + 1)

    def describe(self) -> str:
        return f"StreamingLLM: {self.sink_tokens} sink tokens + a window of {self.window}"


def parse(raw, *, max_position_embeddings: int | None = None) -> Streaming | None:
    """`lckv_streaming` as found in a config (a dict, or None/absent: off).  Errors name the field."""
    if raw is None or raw is False:
        return None
    if isinstance(raw, Streaming):
        return raw
    if not isinstance(raw, dict):
        raise StreamingError(f'{FIELD}: expected an object like {{"sink_tokens": 4, "window": 252}}, got {raw!r}')
    unknown = sorted(set(raw) - {"sink_tokens", "window"})
    if unknown:
        raise StreamingError(f"{FIELD}: unknown key(s) {', '.join(map(repr, unknown))}; expected sink_tokens, window")
    values = {}
    for key, low in (("sink_tokens", 0), ("window", 1)):
        if key not in raw:
            raise StreamingError(f"{FIELD}.{key}: missing")
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise StreamingError(f"{FIELD}.{key}: expected an integer >= {low}, got {v!r}")
        values[key] = v
    s = Streaming(**values)
    if max_position_embeddings is not None and s.span > max_position_embeddings:
        raise StreamingError(
            f"{FIELD}: sink_tokens + window = {s.span} exceeds max_position_embeddings = {max_position_embeddings}: "
            f"cache positions beyond the trained context would be rotated at angles the model never saw")
    return s


def check_rope(config) -> None:
    """Pos-shift re-rotates keys with plain RoPE; a scaled or partial rotary embedding is not implemented."""
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
    if kind not in (None, "default"):
        raise StreamingError(f"{FIELD}: needs plain RoPE, but rope_parameters.rope_type is {kind!r}")
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is None and isinstance(rp, dict):
        partial = rp.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise StreamingError(f"{FIELD}: needs RoPE over the whole head, but partial_rotary_factor is {partial!r}")


def streaming_from_config(config) -> Streaming | None:
    raw = getattr(config, FIELD, None)
    if raw is None:
        return None
    s = parse(raw, max_position_embeddings=getattr(config, "max_position_embeddings", None))
    check_rope(config)
    return s
