"""Locust load test for an OpenAI-compatible server (lckv-serve or `vllm serve`): streamed completions over HTTP.

Each simulated user sends streamed /v1/completions with random prompts and `ignore_eos`, so every request produces
exactly LCKV_LOAD_MAX_TOKENS tokens.  Per request it measures, with `vllm bench serve`'s names: TTFT (to the first
token), TPOT (mean time per output token after the first), ITL (gaps between streamed chunks) and E2EL; at the end
it writes request throughput, output token throughput and mean/p50/p99 of each to LCKV_LOAD_OUT (JSON).

Bounded by design: loopback hosts only (anything else stops the run at start), at most LCKV_LOAD_REQUESTS requests
(then the runner quits), and `--run-time` on the command line.  Environment: LCKV_LOAD_MODEL (served name),
LCKV_LOAD_API_KEY, LCKV_LOAD_PROMPT_TOKENS (approximate prompt length, default 64), LCKV_LOAD_MAX_TOKENS (default
32), LCKV_LOAD_REQUESTS (default 64), LCKV_LOAD_SEED, LCKV_LOAD_OUT.  Run through `loadtests/run.py`, or e.g.
`locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 4 -r 4 -t 60s`.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading

from locust import HttpUser, events, task
from locust.exception import StopUser
from sse import Run, check_loopback, latency_ms

MODEL = os.environ.get("LCKV_LOAD_MODEL")
API_KEY = os.environ.get("LCKV_LOAD_API_KEY")
PROMPT_TOKENS = int(os.environ.get("LCKV_LOAD_PROMPT_TOKENS", "64"))
MAX_TOKENS = int(os.environ.get("LCKV_LOAD_MAX_TOKENS", "32"))
MAX_REQUESTS = int(os.environ.get("LCKV_LOAD_REQUESTS", "64"))
OUT = os.environ.get("LCKV_LOAD_OUT")

_WORDS = ("the of and to in is was that for on with as by at from his her they this which an be or had not are but "
          "what all were when we there can more if no out so said one about up them into time than only could new "
          "some these two may first then do any like my now over such our man me even most made after also").split()

RUN = Run(MAX_REQUESTS)
_users_lock = threading.Lock()
_users = 0


def _prompt(rng: random.Random) -> str:
    # ~1 token per common English word with the Llama tokenizer; the server reports the exact count in `usage`.
    return " ".join(rng.choice(_WORDS) for _ in range(PROMPT_TOKENS))


@events.init.add_listener
def _check_host(environment, **_):
    check_loopback(environment, "locustfile")


class CompletionUser(HttpUser):
    def on_start(self):
        global _users
        with _users_lock:
            index, _users = _users, _users + 1
        self.rng = random.Random(int(os.environ.get("LCKV_LOAD_SEED", "0")) * 1000 + index)
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task
    def stream_completion(self):
        if RUN.take() is None:
            raise StopUser()
        try:
            self._one()
        finally:
            RUN.done(self.environment)

    def _one(self):
        body = {"prompt": _prompt(self.rng), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        if MODEL:
            body["model"] = MODEL
        done = RUN.completion(self.client, body, "/v1/completions (stream)")
        if done is None:
            return
        t0, t1, chunk_times, _, usage = done
        out_tokens = usage["completion_tokens"]
        ttft = chunk_times[0] - t0
        sample = {"ttft": ttft, "e2el": t1 - t0, "output_tokens": out_tokens, "prompt_tokens": usage["prompt_tokens"],
                  "tpot": (t1 - chunk_times[0]) / (out_tokens - 1) if out_tokens > 1 else None,
                  "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])]}
        events.request.fire(request_type="TTFT", name="first token", response_time=ttft * 1000,
                            response_length=0, exception=None, context={})
        RUN.add(sample, t0, t1)


def summary() -> dict:
    samples, failures, span = RUN.snapshot()
    out_tokens = sum(s["output_tokens"] for s in samples)
    return {
        "completed": len(samples),
        "failed": failures,
        "duration_s": span,
        "request_throughput_per_s": len(samples) / span if span else None,
        "output_token_throughput_per_s": out_tokens / span if span else None,
        "mean_prompt_tokens": statistics.fmean(s["prompt_tokens"] for s in samples) if samples else None,
        "output_tokens_per_request": MAX_TOKENS,
        "ttft": latency_ms([s["ttft"] for s in samples]),
        "tpot": latency_ms([s["tpot"] for s in samples if s["tpot"] is not None]),
        "itl": latency_ms([x for s in samples for x in s["itl"]]),
        "e2el": latency_ms([s["e2el"] for s in samples]),
    }


@events.quitting.add_listener
def _write_summary(environment, **_):
    if OUT:
        with open(OUT, "w") as f:
            json.dump(summary(), f, indent=2)
