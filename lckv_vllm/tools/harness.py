"""Helpers shared by the scripts around the plugin (the demo, benchmarks, load tests, server tests): a child server
on a free loopback port, waiting for its /health, stopping it, and the machine description stored with results.

Kept in the package so that each of those places imports one copy instead of keeping its own.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll `url`/health until it answers 200; raise if `proc` exits first or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> int | None:
    """SIGTERM the server itself (not its process group: it must shut its engine down), SIGKILL the group if it
    has not exited after `timeout` s; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def machine() -> dict:
    """What a benchmark result was measured on."""
    import torch
    import vllm

    import lckv_vllm

    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm.__version__, "lckv_vllm": lckv_vllm.__version__, "os": platform.system(),
            "avx512": bool(torch.cpu._is_avx512_supported()), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def read_metrics(url: str) -> dict[str, float]:
    """GET `url`/metrics, parsed."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())
