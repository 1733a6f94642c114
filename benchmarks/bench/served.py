"""Served measurements: lckv-serve per model on loopback, loads with a fixed arrival rate driven by locust.

Each server is `lckv-serve` (through serve_probe.py, which adds a stat logger for preemptions and the largest
number of running requests) with the model's KV budget as `--kv-cache-memory-bytes`, the benchmark's block size,
max_num_seqs, max_model_len and max_num_batched_tokens.  The servers start side by side and stay up together
(idle ones cost next to nothing) so that the loads can go round-robin over them, round after round, like the
offline engines.
A load is locust_rate.py: one user that sends the requests at fixed intervals, each streamed in its own greenlet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lckv_vllm.tools.harness import Server as Child, launch as start, read_metrics, server_env

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


@dataclass
class Server(Child):
    """A harness server with the probe's statistics file and the KV capacity read after start-up."""
    stats: Path = None
    capacity_tokens: int | None = None

    def read_stats(self) -> dict:
        try:
            return json.loads(self.stats.read_text())
        except (OSError, ValueError):
            return {}

    def reset_max(self) -> None:
        """Ask the probe to restart its running-requests maximum at the next engine step."""
        Path(f"{self.stats}.reset").write_text("")



def launch(name: str, path: Path, budget_bytes: int, opts: dict, tmp: Path) -> Server:
    """Start lckv-serve (through serve_probe.py) without waiting for it: servers start side by side."""
    from lckv_vllm.tools.harness import free_port

    port = free_port()
    url = f"http://{HOST}:{port}"
    log = tmp / f"{name}-server.log"
    stats = tmp / f"{name}-stats.json"
    cmd = [sys.executable, str(HERE / "serve_probe.py"), str(path), "--host", HOST, "--port", str(port),
           "--served-model-name", name, "--dtype", "float32", "--block-size", str(opts["block_size"]),
           "--kv-cache-memory-bytes", str(budget_bytes), "--max-num-seqs", str(opts["max_num_seqs"]),
           "--max-model-len", str(opts["max_model_len"]),
           "--max-num-batched-tokens", str(opts["max_num_batched_tokens"]), "--seed", str(opts["seed"])]
    if not opts["compiled"]:
        cmd.append("--enforce-eager")
    env = server_env(TOKENIZERS_PARALLELISM="false", LCKV_BENCH_STATS=str(stats))
    child = start(cmd, log, url, env, name=name)
    return Server(child.proc, child.url, child.log, name, child.startup_s, stats=stats)


def wait_ready(srv: Server, timeout: float = 900) -> None:
    """Wait for /health, send one short request (the first measured TTFT is then not the engine's first-step
    set-up) and read the KV capacity from /metrics."""
    srv.wait_ready(timeout, tail=30)  # raises harness.ServerStartError (a RuntimeError) with the log's last lines
    srv.complete({"model": srv.name, "prompt": [5, 6, 7, 8], "max_tokens": 2, "ignore_eos": True}, timeout=300)
    cap = read_metrics(srv.url).get("lckv_kv_capacity_tokens")
    srv.capacity_tokens = int(cap) if cap is not None else None


def run_load(srv: Server, prompts: list[list[int]], max_tokens: int, rate: float, tmp: Path, tag: str,
             timeout: float = 900) -> dict:
    """One fixed-rate load against `srv`: samples plus the preemptions and the largest running count during it."""
    spec = tmp / f"{srv.name}-{tag}-load.json"
    out = tmp / f"{srv.name}-{tag}-samples.json"
    spec.write_text(json.dumps({"model": srv.name, "prompts": prompts, "max_tokens": max_tokens, "rate": rate,
                                "out": str(out)}))
    before = srv.read_stats()
    srv.reset_max()
    cmd = [str(BIN / "locust"), "-f", str(HERE / "locust_rate.py"), "--headless", "-H", srv.url, "-u", "1",
           "-r", "1", "-t", f"{int(timeout)}s", "--stop-timeout", "10", "--only-summary", "--loglevel", "WARNING"]
    env = dict(os.environ, LCKV_BENCH_LOAD=str(spec))
    with open(tmp / f"{srv.name}-{tag}-locust.log", "w") as log:
        subprocess.run(cmd, env=env, timeout=timeout + 120, check=False, stdout=subprocess.DEVNULL, stderr=log)
    if not out.exists():
        raise RuntimeError(f"[{srv.name}] the load wrote no samples; see {tmp / f'{srv.name}-{tag}-locust.log'}")
    data = json.loads(out.read_text())
    time.sleep(0.2)  # the probe writes its file from the server's output loop
    after = srv.read_stats()
    pre = (after.get("preemptions", 0) - before.get("preemptions", 0)) if after else None
    return {"samples": data["samples"], "failures": data["failures"], "duration": data["t_end"] - data["t0"],
            "preemptions": pre, "max_concurrency": after.get("max_running") if after else None}
