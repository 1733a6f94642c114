"""What the locust files share: reading one streamed OpenAI completion (SSE) and latency statistics in ms.

Imported by loadtests/locustfile.py and loadtests/chat_locustfile.py (locust puts a locustfile's folder on the
import path)."""

from __future__ import annotations

import json
import statistics
import time


def read_sse(response) -> tuple[list[float], list[str], dict | None]:
    """Consume a streamed /v1/completions response: arrival time and text of every chunk that carries text, and the
    usage chunk (None if the stream had none)."""
    times: list[float] = []
    texts: list[str] = []
    usage = None
    for line in response.iter_lines():
        if not line or not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if event.get("choices") and event["choices"][0].get("text"):
            times.append(time.perf_counter())
            texts.append(event["choices"][0]["text"])
        if event.get("usage"):
            usage = event["usage"]
    return times, texts, usage


def latency_ms(values: list[float]) -> dict:
    """mean / p50 / p99 in milliseconds of latencies in seconds (None when there are none)."""
    if not values:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))] * 1000

    return {"mean_ms": statistics.fmean(v) * 1000, "p50_ms": pct(50), "p99_ms": pct(99)}
