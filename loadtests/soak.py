"""Soak test: locust at saturation against lckv-serve on a tiny model, for a fixed time; no failure, flat memory,
steady tail latency.

    .venv/bin/python -m loadtests.soak --duration 600 --out benchmarks/results/soak.json     # the 10-minute run
    .venv/bin/python -m loadtests.soak --duration 60 --bucket 10 --out /tmp/soak-smoke.json   # a smoke run

The script starts lckv-serve (preset tiny-w2 in a temporary directory, 127.0.0.1 only, --max-num-seqs 16), sends
one warm-up request, then runs locust in-process with --users simulated users (default 32: twice max_num_seqs, so
the engine always has a full batch and a queue) that send streamed /v1/completions back to back (no wait time,
~32-token prompts, 32 tokens each with ignore_eos) until --duration seconds have passed; then it stops the users and
the server (SIGTERM) by itself.  Every 5 s it samples the resident memory of the server and its engine process(es)
(psutil, RSS summed over the process tree); per --bucket seconds (default 60) it reports requests, failures,
throughput and p50/p99 end-to-end latency.

Verdict (in the JSON, and the exit status): zero failed requests (a failure: a status other than 200, a stream
that does not end in `data: [DONE]`, an error event, or usage.completion_tokens other than asked); resident memory
at the end within 10 % of what it was after the first bucket (the warm-up: allocator pools, kernels and caches
fill up during it); and p99 latency stable: the p99 over the second half of the run at most 25 % above the p99 over
the first half (after the warm-up bucket): a server that leaks or fragments gets slower as it goes.  The per-bucket
p99s are reported too; on a shared 2-core machine single buckets are noisy.  Loopback only; bounded by --duration and a 60 s per-request timeout.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # before anything imports ssl/socket: locust runs on gevent

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlparse  # noqa: E402


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVER_ARGS = ["--max-model-len", "512", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(64 << 20),
               "--enforce-eager"]
WORDS = ("the of and to in is was that for on with as by at from his her they this which an be or had not are but "
         "what all were when we there can more if no out so said one about up them into time than only").split()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def soak(url: str, model: str, api_key: str | None, server_pid: int, *, duration: float, users: int,
         bucket: float, prompt_words: int, max_tokens: int, seed: int) -> dict:
    import gevent
    from locust import HttpUser, constant, task
    from locust.env import Environment

    if urlparse(url).hostname not in LOOPBACK:
        raise SystemExit(f"soak: refusing {url!r}: loopback only")
    samples: list[tuple[float, float, bool]] = []  # (end time, seconds, ok)
    failures: list[str] = []
    rss: list[tuple[float, int]] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)

    class Client(HttpUser):
        host = url
        wait_time = constant(0)

        @task
        def completion(self):
            body = {"model": model, "prompt": " ".join(rng.choice(WORDS) for _ in range(prompt_words)),
                    "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0.7,
                    "stream_options": {"include_usage": True}}
            t0 = time.monotonic()
            ok, why = False, None
            with self.client.post("/v1/completions", json=body, headers=headers, stream=True, timeout=60,
                                  catch_response=True, name="stream") as r:
                try:
                    if r.status_code != 200:
                        why = f"status {r.status_code}: {r.text[:200]}"
                    else:
                        events_ = [line for line in r.iter_lines() if line]
                        chunks = [e for e in events_ if e.startswith(b"data: {")]
                        if events_[-1:] != [b"data: [DONE]"] or any(b'"error"' in c for c in chunks):
                            why = f"stream did not end cleanly: {events_[-2:]!r}"[:300]
                        else:  # the usage chunk (deltas may carry more than one token each)
                            usage = json.loads(chunks[-1][6:]).get("usage") if chunks else None
                            if not usage or usage.get("completion_tokens") != max_tokens:
                                why = f"usage {usage} for {max_tokens} tokens"
                            else:
                                ok = True
                except Exception as e:  # noqa: BLE001 - a broken stream is a failure to report, not a crash
                    why = f"{type(e).__name__}: {e}"[:300]
                if ok:
                    r.success()
                else:
                    r.failure(why)
            samples.append((time.monotonic(), time.monotonic() - t0, ok))
            if not ok:
                failures.append(why)

    env = Environment(user_classes=[Client])
    runner = env.create_local_runner()

    def sample_rss():
        while True:
            rss.append((time.monotonic(), _rss(server_pid)))
            gevent.sleep(5)

    t_start = time.monotonic()
    sampler = gevent.spawn(sample_rss)
    runner.start(users, spawn_rate=users)
    gevent.sleep(duration)
    runner.stop()
    runner.quit()
    sampler.kill()
    rss.append((time.monotonic(), _rss(server_pid)))
    elapsed = time.monotonic() - t_start

    buckets = []
    n_buckets = max(1, int(duration // bucket))
    for i in range(n_buckets):
        lo, hi = t_start + i * bucket, t_start + (i + 1) * bucket
        inside = [s for s in samples if lo <= s[0] < hi]
        lat = [s[1] for s in inside if s[2]]
        buckets.append({"from_s": round(i * bucket), "to_s": round((i + 1) * bucket), "requests": len(inside),
                        "failures": sum(1 for s in inside if not s[2]),
                        "requests_per_s": round(len(inside) / bucket, 2),
                        "p50_s": _round(_percentile(lat, 50)), "p99_s": _round(_percentile(lat, 99))})
    warm_rss = next((v for t, v in rss if t >= t_start + bucket), rss[-1][1])
    end_rss = rss[-1][1]
    p99s = [b["p99_s"] for b in buckets[1:] if b["p99_s"] is not None]
    # drift: p99 over the second half of the run against p99 over the first half (after the warm-up bucket)
    mid = t_start + bucket + (duration - bucket) / 2
    first = [s[1] for s in samples if s[2] and t_start + bucket <= s[0] < mid]
    second = [s[1] for s in samples if s[2] and s[0] >= mid]
    drift = _percentile(second, 99) / _percentile(first, 99) if first and second else None
    verdict = {
        "zero_failures": not failures,
        "rss_growth_after_warmup": round(end_rss / warm_rss - 1, 4),
        "rss_flat_within_10pct": abs(end_rss / warm_rss - 1) <= 0.10,
        "p99_first_half_s": _round(_percentile(first, 99)),
        "p99_second_half_s": _round(_percentile(second, 99)),
        "p99_drift": _round(drift),
        "p99_no_growth_over_25pct": drift is not None and drift <= 1.25,
        "p99_bucket_max_over_median": round(max(p99s) / statistics.median(p99s), 3) if p99s else None,
    }
    verdict["passed"] = verdict["zero_failures"] and verdict["rss_flat_within_10pct"] and \
        verdict["p99_no_growth_over_25pct"]
    return {
        "duration_s": round(elapsed, 1),
        "users": users,
        "requests": len(samples),
        "failures": len(failures),
        "failure_examples": failures[:5],
        "requests_per_s": round(len(samples) / elapsed, 2),
        "output_tokens_per_s": round(sum(1 for s in samples if s[2]) * max_tokens / elapsed, 1),
        "latency_s": {"p50": _round(_percentile([s[1] for s in samples if s[2]], 50)),
                      "p99": _round(_percentile([s[1] for s in samples if s[2]], 99))},
        "buckets": buckets,
        "rss_bytes": {"start": rss[0][1], "after_warmup": warm_rss, "end": end_rss,
                      "max": max(v for _, v in rss), "samples_every_5s": [v for _, v in rss]},
        "verdict": verdict,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default %(default)s)")
    p.add_argument("--bucket", type=float, default=60, help="seconds per reporting bucket (default %(default)s)")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--model", default="tiny-w2", help="preset or checkpoint directory")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="a note stored in the report (e.g. 'smoke run')")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from loadtests.common import command_line, write_results, machine, model_path, post_json, start_server

    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="lckv-soak-") as d:
        tmp = Path(d)
        srv = start_server(model_path(args.model, tmp), tmp / "server.log", name="tiny", extra=SERVER_ARGS)
        try:
            post_json(srv.url + "/v1/completions", {"model": "tiny", "prompt": "warm up", "max_tokens": 2})
            print(f"soak: {args.users} users for {args.duration:.0f} s against {srv.url}", flush=True)
            report = soak(srv.url, "tiny", None, srv.proc.pid, duration=args.duration, users=args.users,
                          bucket=args.bucket, prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                          seed=args.seed)
            report["server_after"] = {k: v for k, v in srv.metrics().items()
                                      if k.startswith(("lckv_requests_running", "lckv_requests_waiting",
                                                       "lckv_requests_unfinished", "lckv_kv_usage_ratio"))}
        finally:
            report_exit = srv.stop()
            log_text = srv.log.read_text(errors="replace")
    report["server_exit_code"] = report_exit
    report["server_log_has_traceback"] = "Traceback" in log_text
    report["setup"] = {**machine(), "label": args.label, "server_args": SERVER_ARGS,
                       "prompt_words": args.prompt_words, "max_tokens": args.max_tokens, "seed": args.seed,
                       "command": command_line("loadtests.soak", argv)}
    if args.out:
        write_results(args.out, report)
    v = report["verdict"]
    print(f"soak: {report['requests']} requests, {report['failures']} failures, {report['requests_per_s']} req/s; "
          f"RSS {report['rss_bytes']['after_warmup'] / 2**20:.0f} -> {report['rss_bytes']['end'] / 2**20:.0f} MiB "
          f"({v['rss_growth_after_warmup']:+.1%}); p99 per bucket {[b['p99_s'] for b in report['buckets']]}, "
          f"drift {v['p99_drift']}; "
          f"{'PASSED' if v['passed'] else 'FAILED'}")
    return 0 if v["passed"] and report_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
