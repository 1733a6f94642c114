"""What the locust files share: one streamed OpenAI completion (SSE) measured, the run's samples, its request
budget, and latency statistics in ms.

Imported by loadtests/locustfile.py and loadtests/chat_locustfile.py (locust puts a locustfile's folder on the
import path)."""

from __future__ import annotations

import statistics
import threading
import time
from urllib.parse import urlparse

import gevent

from lckv_vllm.tools.harness import sse_events

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(environment, who: str) -> None:
    """Stop the run at start unless it targets this machine: the load tests are not for other people's servers."""
    if urlparse(environment.host or "").hostname not in LOOPBACK:
        raise SystemExit(f"{who}: refusing to load-test {environment.host!r}: loopback hosts only")


def read_sse(response) -> tuple[list[float], list[str], dict | None]:
    """Consume a streamed /v1/completions response: arrival time and text of every chunk that carries text, and the
    usage chunk (None if the stream had none)."""
    times: list[float] = []
    texts: list[str] = []
    usage = None
    for event in sse_events(response.iter_lines()):
        if event.get("choices") and event["choices"][0].get("text"):
            times.append(time.perf_counter())
            texts.append(event["choices"][0]["text"])
        if event.get("usage"):
            usage = event["usage"]
    return times, texts, usage


class Run:
    """The run's shared state across locust users (greenlets): samples, failures, the first start and last end,
    and a budget of `limit` units (requests, conversations) after which the runner quits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.lock = threading.Lock()
        self.started = self.finished = self.failures = 0
        self.samples: list[dict] = []
        self.t_first: float | None = None
        self.t_last: float | None = None

    def take(self) -> int | None:
        """The index of the next unit, or None when the budget is spent."""
        with self.lock:
            if self.started >= self.limit:
                return None
            self.started += 1
            return self.started - 1

    def done(self, environment) -> None:
        """One unit finished; after the last, stop the whole run (from another greenlet, not this user's)."""
        with self.lock:
            self.finished += 1
            last = self.finished >= self.limit
        if last:
            gevent.spawn_later(0, environment.runner.quit)

    def completion(self, client, body: dict, name: str):
        """POST a streamed /v1/completions and time it: (t0, t1, chunk times, texts, usage), or None after
        recording the failure (an HTTP error, or a stream without tokens or usage)."""
        t0 = time.perf_counter()
        with client.post("/v1/completions", json=body, stream=True, catch_response=True, name=name) as r:
            if r.status_code != 200:
                return self._failed(r, f"HTTP {r.status_code}: {r.text[:200]}")
            times, texts, usage = read_sse(r)
            t1 = time.perf_counter()
            if not times or not usage:
                return self._failed(r, "no tokens or no usage in the stream")
            r.success()
        return t0, t1, times, texts, usage

    def _failed(self, response, why: str) -> None:
        response.failure(why)
        with self.lock:
            self.failures += 1

    def add(self, sample: dict, t0: float, t1: float) -> None:
        with self.lock:
            self.samples.append(sample)
            self.t_first = t0 if self.t_first is None else min(self.t_first, t0)
            self.t_last = t1 if self.t_last is None else max(self.t_last, t1)

    def snapshot(self) -> tuple[list[dict], int, float]:
        """(samples, failures, seconds from the first start to the last end)."""
        with self.lock:
            span = self.t_last - self.t_first if self.t_first is not None and self.t_last is not None else 0.0
            return list(self.samples), self.failures, span


def latency_ms(values: list[float]) -> dict:
    """mean / p50 / p99 in milliseconds of latencies in seconds (None when there are none)."""
    if not values:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))] * 1000

    return {"mean_ms": statistics.fmean(v) * 1000, "p50_ms": pct(50), "p99_ms": pct(99)}
