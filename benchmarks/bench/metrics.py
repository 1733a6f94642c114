"""Per-request timings -> the numbers `vllm bench serve` reports, under its names.

A sample is one request: `arrival` (when it was sent), `tokens` (when each streamed chunk or engine step delivered
new tokens), `end` (when it finished), `output_tokens`, `prompt_tokens`; all in seconds on one clock.  The offline
runner and the served runner both produce samples, so both are summarised by the same code:

  TTFT  first delivery - arrival                  TPOT  (E2EL - TTFT) / (output tokens - 1)
  ITL   gaps between consecutive deliveries       E2EL  end - arrival

and for each the mean, p50 and p99 in milliseconds (`mean_ttft_ms`, `p50_ttft_ms`, `p99_ttft_ms`, ...), with
numpy's linear-interpolation percentiles as `vllm bench serve` uses.
"""

from __future__ import annotations

import statistics

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "p50", "p99")
LATENCY_FIELDS = tuple(f"{s}_{m}_ms" for m in LATENCIES for s in STATS)
THROUGHPUT_FIELDS = ("completed", "failed", "duration_s", "request_throughput", "output_throughput",
                     "total_token_throughput", "total_output_tokens", "total_prompt_tokens")


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    import numpy as np

    v = np.asarray(values, dtype=float) * 1000.0
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def summarize(samples: list[dict], duration: float, failed: int = 0) -> dict:
    """The load's throughputs and latency statistics (ms) from its per-request samples."""
    ttft, tpot, itl, e2el = [], [], [], []
    out_tokens = prompt_tokens = 0
    for s in samples:
        times = s["tokens"]
        out_tokens += s["output_tokens"]
        prompt_tokens += s["prompt_tokens"]
        if not times:
            continue
        first = times[0] - s["arrival"]
        total = s["end"] - s["arrival"]
        ttft.append(first)
        e2el.append(total)
        if s["output_tokens"] > 1:
            tpot.append((total - first) / (s["output_tokens"] - 1))
        itl.extend(b - a for a, b in zip(times, times[1:]))
    res = {
        "completed": len(samples),
        "failed": failed,
        "duration_s": duration,
        "request_throughput": len(samples) / duration if duration > 0 else None,
        "output_throughput": out_tokens / duration if duration > 0 else None,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration if duration > 0 else None,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": prompt_tokens,
    }
    for name, values in zip(LATENCIES, (ttft, tpot, itl, e2el)):
        for stat, value in _stats(values).items():
            res[f"{stat}_{name}_ms"] = value
    return res


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
