"""Helpers for the HTTP server tests: start a server subprocess on a free loopback port, wait for it, read its
/metrics, and stop it with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict:
    env = dict(os.environ)
    # conftest.py sets this for in-process engines; a server should run the way users run it.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


@dataclass
class ServerProc:
    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the server (not its process group: the server must clean up its engine itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def kill_group(self) -> None:
        """Last resort for fixtures: whatever is left of the server's process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start_server(cmd: list[str], log: Path, env: dict, port: int, timeout: float = 240) -> ServerProc:
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = ServerProc(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{srv.log_tail()}")
        try:
            with urllib.request.urlopen(srv.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return srv
        except OSError:
            time.sleep(0.5)
    srv.kill_group()
    raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{srv.log_tail()}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
