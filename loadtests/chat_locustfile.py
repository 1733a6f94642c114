"""Locust multi-turn chat load: conversations that share a system prompt, each turn resending the whole history.

What real chat traffic looks like to a server: every conversation starts with the same system prompt (a few hundred
tokens), and turn t's prompt is the system prompt, the earlier user messages and the assistant's replies, and the new
user message.  With prefix caching, turn 1 finds the system prompt in the cache (after the first conversation) and
turn t >= 2 finds the whole earlier conversation; without it, every turn prefills everything again.

Each simulated user holds one conversation at a time: LCKV_CHAT_TURNS turns of streamed /v1/completions (greedy,
`ignore_eos`, LCKV_CHAT_MAX_TOKENS tokens each), then starts the next one, until LCKV_CHAT_CONVERSATIONS conversations
have started.  Texts are slices of LCKV_CHAT_TEXT (a text file): the system prompt is its first
LCKV_CHAT_SYSTEM_CHARS characters, user messages are later slices of LCKV_CHAT_USER_CHARS characters, distinct per
conversation and turn (from conversation index LCKV_CHAT_FIRST_CONVERSATION on, default 0).  Per turn it records
TTFT, TPOT, E2EL, prompt tokens and the prompt tokens the server took from its prefix cache
(`usage.prompt_tokens_details.cached_tokens`, lckv-serve's OpenAI field); at the end it writes per-turn and overall
statistics to LCKV_LOAD_OUT (JSON).  Loopback hosts only; bounded by the conversation count and `--run-time`.  Run
through benchmarks/prefill_tax.py.
"""

from __future__ import annotations

import json
import os

from locust import HttpUser, events, task
from locust.exception import StopUser
from sse import Run, check_loopback, latency_ms

MODEL = os.environ.get("LCKV_LOAD_MODEL")
OUT = os.environ.get("LCKV_LOAD_OUT")
TEXT = open(os.environ["LCKV_CHAT_TEXT"], encoding="utf-8").read() if os.environ.get("LCKV_CHAT_TEXT") else ""
TURNS = int(os.environ.get("LCKV_CHAT_TURNS", "4"))
CONVERSATIONS = int(os.environ.get("LCKV_CHAT_CONVERSATIONS", "12"))
MAX_TOKENS = int(os.environ.get("LCKV_CHAT_MAX_TOKENS", "32"))
SYSTEM_CHARS = int(os.environ.get("LCKV_CHAT_SYSTEM_CHARS", "1200"))
USER_CHARS = int(os.environ.get("LCKV_CHAT_USER_CHARS", "160"))
# index of the first conversation's text: a second load on the same server takes texts its cache has not seen
FIRST = int(os.environ.get("LCKV_CHAT_FIRST_CONVERSATION", "0"))

RUN = Run(CONVERSATIONS)


@events.init.add_listener
def _check(environment, **_):
    check_loopback(environment, "chat_locustfile")
    if len(TEXT) < SYSTEM_CHARS + (FIRST + CONVERSATIONS) * TURNS * USER_CHARS:
        raise SystemExit("chat_locustfile: LCKV_CHAT_TEXT is too short for the conversations asked for")


def _user_message(conversation: int, turn: int) -> str:
    at = SYSTEM_CHARS + ((FIRST + conversation) * TURNS + turn) * USER_CHARS
    return "\n\nUSER.\n" + TEXT[at:at + USER_CHARS] + "\n\nASSISTANT.\n"


class ChatUser(HttpUser):
    @task
    def conversation(self):
        index = RUN.take()
        if index is None:
            raise StopUser()
        history = TEXT[:SYSTEM_CHARS]
        try:
            for turn in range(TURNS):
                history += _user_message(index, turn)
                reply = self._turn(history, turn)
                if reply is None:
                    return
                history += reply
        finally:
            RUN.done(self.environment)

    def _turn(self, prompt: str, turn: int) -> str | None:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if MODEL:
            body["model"] = MODEL
        done = RUN.completion(self.client, body, f"turn {turn + 1}")
        if done is None:
            return None
        t0, t1, times, text, usage = done
        out = usage["completion_tokens"]
        details = usage.get("prompt_tokens_details") or {}
        sample = {"turn": turn + 1, "ttft": times[0] - t0, "e2el": t1 - t0, "output_tokens": out,
                  "tpot": (t1 - times[0]) / (out - 1) if out > 1 else None, "prompt_tokens": usage["prompt_tokens"],
                  "cached_tokens": details.get("cached_tokens")}
        RUN.add(sample, t0, t1)
        return "".join(text)


def _group(samples: list[dict]) -> dict:
    prompt = sum(s["prompt_tokens"] for s in samples)
    cached = sum(s["cached_tokens"] or 0 for s in samples)
    return {"requests": len(samples), "ttft": latency_ms([s["ttft"] for s in samples]),
            "tpot": latency_ms([s["tpot"] for s in samples if s["tpot"] is not None]),
            "e2el": latency_ms([s["e2el"] for s in samples]),
            "mean_prompt_tokens": prompt / len(samples) if samples else None,
            "prefix_cache_hit_rate": cached / prompt if prompt else None,
            "cached_tokens_reported": all(s["cached_tokens"] is not None for s in samples)}


def summary() -> dict:
    samples, failures, span = RUN.snapshot()
    out = _group(samples)
    out.update(failed=failures, duration_s=span, conversations=CONVERSATIONS, turns=TURNS, max_tokens=MAX_TOKENS,
               output_token_throughput_per_s=sum(s["output_tokens"] for s in samples) / span if span else None,
               per_turn={str(t): _group([s for s in samples if s["turn"] == t]) for t in range(1, TURNS + 1)})
    return out


@events.quitting.add_listener
def _write(environment, **_):
    if OUT:
        with open(OUT, "w") as f:
            json.dump(summary(), f, indent=2)
