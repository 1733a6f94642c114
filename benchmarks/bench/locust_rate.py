"""Locust file of `lckv-vllm bench`'s served part: requests that arrive at a fixed rate (an open loop).

One locust user sends the load's requests at t0, t0 + 1/rate, t0 + 2/rate, ... whatever the server's state, each
in a greenlet of its own, so a new prompt joins the running decodes instead of waiting for a free user (closed-loop
users would slow the arrivals down as the server slows).  Every request is a streamed /v1/completions with a
token-id prompt, `ignore_eos` and `max_tokens`, so each produces exactly that many tokens.  It records, per
request, the arrival, the time of every streamed chunk with a choice (one per engine step that produced tokens
for it; some random token ids decode to no text yet) and the end; the runner turns these into
TTFT/TPOT/ITL/E2EL (benchmarks/bench/metrics.py).  Then it stops the locust run.

Input: the JSON file named by LCKV_BENCH_LOAD: {"model", "prompts": [[ids]], "max_tokens", "rate", "out"}; the
samples go to "out".  Loopback hosts only.  Run by benchmarks/bench/served.py:
  locust -f benchmarks/bench/locust_rate.py --headless -u 1 -r 1 -H http://127.0.0.1:PORT
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlparse

import gevent
from locust import HttpUser, events, task
from locust.exception import StopUser
from requests.adapters import HTTPAdapter

from lckv_vllm.tools.harness import sse_events

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SPEC = json.loads(open(os.environ["LCKV_BENCH_LOAD"]).read()) if os.environ.get("LCKV_BENCH_LOAD") else None


@events.init.add_listener
def _check(environment, **_):
    host = urlparse(environment.host or "").hostname
    if host not in LOOPBACK:
        raise SystemExit(f"locust_rate: refusing {environment.host!r}: loopback hosts only")
    if SPEC is None:
        raise SystemExit("locust_rate: LCKV_BENCH_LOAD (the load's JSON file) is not set")


class FixedRateUser(HttpUser):
    def on_start(self):
        # one connection per request in flight: the arrivals must not queue on the client's pool
        self.client.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=len(SPEC["prompts"]) + 1))

    @task
    def fixed_rate_load(self):
        samples: list[dict] = []
        failures: list[str] = []
        t0 = time.perf_counter()
        greenlets = []
        for i, prompt in enumerate(SPEC["prompts"]):
            delay = t0 + i / SPEC["rate"] - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            greenlets.append(gevent.spawn(self._one, prompt, samples, failures))
        gevent.joinall(greenlets)
        with open(SPEC["out"], "w") as f:
            json.dump({"samples": samples, "failures": failures, "t0": t0, "t_end": time.perf_counter()}, f)
        gevent.spawn_later(0, self.environment.runner.quit)
        raise StopUser()

    def _one(self, prompt: list[int], samples: list[dict], failures: list[str]) -> None:
        body = {"model": SPEC["model"], "prompt": prompt, "max_tokens": SPEC["max_tokens"], "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        arrival = time.perf_counter()
        tokens: list[float] = []
        usage = None
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="/v1/completions (stream)") as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            for event in sse_events(r.iter_lines()):
                if event.get("choices"):  # one chunk per engine step that gave this request tokens
                    tokens.append(time.perf_counter())
                if event.get("usage"):
                    usage = event["usage"]
            end = time.perf_counter()
            if not tokens or not usage:
                r.failure("no tokens or no usage in the stream")
                failures.append("no tokens or no usage in the stream")
                return
            r.success()
        samples.append({"arrival": arrival, "tokens": tokens, "end": end,
                        "output_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"]})
