"""Disconnect storm: streaming requests abandoned at random points; afterwards the engine must be empty.

    .venv/bin/python -m loadtests.storm [--requests 200] [--concurrency 64] [--out FILE]
    .venv/bin/python -m loadtests.storm --url http://127.0.0.1:8000 --api-key KEY --model NAME

Each request is a streamed /v1/completions or /v1/chat/completions (ignore_eos, up to --max-tokens tokens, n 1 or
2), and each client goes away at a point drawn at random (seeded): half-way through sending its body, right after
sending it (before the response starts), after the response headers, after 1..40 streamed events, or at a random
time.  Afterwards the server's /metrics must show no running or waiting request in the engine, nothing unfinished in
the front end, no admitted sequence and a KV cache usage of 0, within --settle seconds; then a normal request must
succeed.  Without --url the script starts lckv-serve on a tiny model and stops it at the end.  The test suite
(tests/test_server_hostile.py) runs `storm()` with 200 requests against its own server.

Loopback only; bounded by the request count, a per-request deadline and the settle timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
POINTS = ("mid-body", "after-send", "after-headers", "after-events", "random-time")
SERVER_ARGS = ["--max-model-len", "512", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(64 << 20),
               "--enforce-eager"]


def _body(rng: random.Random, model: str, max_tokens: int) -> tuple[str, bytes]:
    n = rng.choice((1, 1, 2))
    words = " ".join(rng.choice(("storm", "cancel", "token", "cache", "layer", "stream")) for _ in range(
        rng.randrange(4, 60)))
    if rng.random() < 0.5:
        path = "/v1/completions"
        body = {"model": model, "prompt": words, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "n": n, "temperature": 0.8, "seed": rng.randrange(1 << 30)}
    else:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "n": n, "stream_options": {"include_usage": True}}
    return path, json.dumps(body).encode()


async def _one(host: str, port: int, api_key: str | None, path: str, body: bytes, point: str, events: int,
               delay: float, deadline: float) -> dict:
    """One client on a raw socket, so that "going away" is exactly a closed connection at the chosen point."""
    out = {"point": point, "events": 0, "status": None}
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Authorization: Bearer {api_key}\r\n" if api_key else "") + "\r\n").encode()
        if point == "mid-body":
            writer.write(head + body[:len(body) // 2])
            await writer.drain()
            await asyncio.sleep(delay)
            return out
        writer.write(head + body)
        await writer.drain()
        if point == "after-send":
            await asyncio.sleep(delay)
            return out

        async def consume():
            status_line = await reader.readline()
            out["status"] = int(status_line.split()[1]) if status_line else None
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # headers
            if point == "after-headers":
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    out["events"] += 1
                    if line.startswith(b"data: [DONE]"):
                        out["finished"] = True
                        return
                    if point == "after-events" and out["events"] >= events:
                        return

        timeout = delay if point == "random-time" else deadline
        try:
            await asyncio.wait_for(consume(), timeout)
        except TimeoutError:
            out["timed_out"] = point != "random-time"
        return out
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _storm(base_url: str, api_key: str | None, model: str, requests: int, concurrency: int, seed: int,
                 max_tokens: int, deadline: float) -> list[dict]:
    u = urlparse(base_url)
    rng = random.Random(seed)
    plans = []
    for _ in range(requests):
        path, body = _body(rng, model, max_tokens)
        plans.append((path, body, rng.choice(POINTS), rng.randrange(1, 41), rng.uniform(0.0, 1.5)))
    sem = asyncio.Semaphore(concurrency)

    async def run(plan):
        async with sem:
            try:
                return await _one(u.hostname, u.port, api_key, *plan, deadline=deadline)
            except OSError as e:
                return {"point": plan[2], "error": f"{type(e).__name__}: {e}"}

    return await asyncio.gather(*(run(p) for p in plans))


def wait_idle(metrics, settle: float) -> tuple[float, dict]:
    """Poll `metrics()` until the engine and the front end hold nothing; return (seconds, last metrics)."""
    t0 = time.monotonic()
    while True:
        m = metrics()
        idle = (m["lckv_requests_running"] == 0 and m["lckv_requests_waiting"] == 0
                and m["lckv_requests_unfinished"] == 0 and m["lckv_sequences_admitted"] == 0
                and m["lckv_kv_usage_ratio"] == 0)
        if idle or time.monotonic() - t0 > settle:
            return time.monotonic() - t0, m
        time.sleep(0.1)


def storm(base_url: str, api_key: str | None, model: str, metrics, *, requests: int = 200, concurrency: int = 64,
          seed: int = 0, max_tokens: int = 128, deadline: float = 60.0, settle: float = 30.0) -> dict:
    """Run the storm and the after-checks; `metrics()` returns the server's /metrics as {name: value}."""
    import httpx

    if urlparse(base_url).hostname not in LOOPBACK:
        raise SystemExit(f"storm: refusing {base_url!r}: loopback only")
    before = metrics()
    t0 = time.monotonic()
    results = asyncio.run(_storm(base_url, api_key, model, requests, concurrency, seed, max_tokens, deadline))
    storm_s = time.monotonic() - t0
    settle_s, after = wait_idle(metrics, settle)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(base_url + "/v1/completions", headers=headers, timeout=120,
                   json={"model": model, "prompt": "after the storm", "max_tokens": 8, "ignore_eos": True})
    def delta(status: int) -> float:
        key = 'lckv_requests_total{endpoint="%s",status="%d"}'
        return sum(after.get(key % (ep, status), 0) - before.get(key % (ep, status), 0)
                   for ep in ("/v1/completions", "/v1/chat/completions"))

    return {
        "requests": len(results),
        "concurrency": concurrency,
        "points": dict(collections.Counter(x["point"] for x in results)),
        "finished_before_cancel": sum(1 for x in results if x.get("finished")),
        "cancelled": sum(1 for x in results if not x.get("finished") and "error" not in x),
        "client_errors": [x["error"] for x in results if "error" in x][:10],
        "timed_out": sum(1 for x in results if x.get("timed_out")),
        "statuses": dict(collections.Counter(str(x.get("status")) for x in results)),
        "events_received": sum(x.get("events", 0) for x in results),
        "storm_seconds": round(storm_s, 2),
        "settle_seconds": round(settle_s, 2),
        "server_499_responses": delta(499),
        "server_5xx_responses": delta(500) + delta(503),
        "after": {k: after.get(k) for k in ("lckv_requests_running", "lckv_requests_waiting",
                                            "lckv_requests_unfinished", "lckv_sequences_admitted",
                                            "lckv_kv_usage_ratio", "lckv_engine_healthy")},
        "normal_request_status": r.status_code,
        "normal_request_tokens": r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="storm this running server (default: start one on --model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="tiny-w2", help="preset or checkpoint (started server) / served name (--url)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=30.0, help="seconds the server may take to become idle")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from loadtests.common import command_line, write_results, machine, model_path, read_metrics, start_server

    with tempfile.TemporaryDirectory(prefix="lckv-storm-") as d:
        tmp = Path(d)
        srv = None
        url, name = args.url, args.model
        if url is None:
            srv = start_server(model_path(args.model, tmp), tmp / "server.log", name="tiny", extra=SERVER_ARGS)
            url, name = srv.url, "tiny"
        try:
            import httpx

            httpx.post(url + "/v1/completions", json={"model": name, "prompt": "warm up", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}, timeout=120)
            report = storm(url, args.api_key, name, lambda: read_metrics(url), requests=args.requests, concurrency=args.concurrency,
                           seed=args.seed, max_tokens=args.max_tokens, settle=args.settle)
        finally:
            if srv is not None:
                report_exit = srv.stop()
        if srv is not None:
            report["server_exit_code"] = report_exit
    report["setup"] = {**machine(), "server_args": None if args.url else SERVER_ARGS, "seed": args.seed,
                       "command": command_line("loadtests.storm", argv)}
    print(json.dumps(report, indent=2))
    if args.out:
        write_results(args.out, report)
    a = report["after"]
    ok = (a["lckv_requests_running"] == 0 and a["lckv_requests_waiting"] == 0 and a["lckv_requests_unfinished"] == 0
          and a["lckv_sequences_admitted"] == 0 and a["lckv_kv_usage_ratio"] == 0
          and report["normal_request_status"] == 200)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
