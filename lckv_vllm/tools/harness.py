"""Helpers shared by the scripts around the plugin (the demo, benchmarks, load tests, server tests): a child server
on a free loopback port (`serve()`: start, wait for /health, warm up, log tail on failure, stop), an in-process
engine (`offline_engine()`, `model_of()`), the machine description stored with results and the result writer.

Kept in the package so that each of those places imports one copy instead of keeping its own (benchmarks/ and
loadtests/ are repository packages run as `python -m benchmarks.NAME`; this module is importable from them, the
demo and the tests without any sys.path edit).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent  # the venv's console scripts (lckv-serve, vllm, locust)
ROOT = Path(__file__).resolve().parents[2]  # the repository, in a source checkout
IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": vLLM's engine core runs in this process (model_of() reaches it)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300, poll: float = 1.0) -> None:
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
            time.sleep(poll)
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


def machine(short: bool = False) -> dict:
    """What a benchmark result was measured on.  `short`: the load tests' form (one "machine" line, python, vllm,
    lckv_vllm, date), as their committed reports (benchmarks/results/{fuzz,storm,soak}.json) have it."""
    if short:
        import vllm

        import lckv_vllm

        return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
                "python": platform.python_version(), "vllm": vllm.__version__, "lckv_vllm": lckv_vllm.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
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


# ---- a child server --------------------------------------------------------------------------------------------------


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health in time; the message ends with the last lines of its log."""


def server_env(base: dict | None = None, **extra: str) -> dict:
    """The environment of a child lckv-serve: this one (or `base`) without VLLM_ENABLE_V1_MULTIPROCESSING (scripts
    and tests set it for their in-process engines; a server runs the way users run it), tokenizers single-threaded
    unless set, plus `extra`."""
    env = dict(os.environ if base is None else base)
    env.pop(IN_PROCESS, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    name: str = ""
    startup_s: float = 0.0  # seconds from launch() to /health answering

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log, n)

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url)

    def stop(self, timeout: float = 60, group: bool = False) -> int | None:
        """SIGTERM the server and wait (see stop_process); `group`: SIGTERM its whole process group first (`vllm
        serve` runs its engine in a child process)."""
        if group and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        return stop_process(self.proc, timeout)

    def kill_group(self) -> None:
        """Last resort: SIGKILL whatever is left of the server's process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_ready(self, timeout: float = 300, poll: float = 1.0, tail: int = 40) -> None:
        """Wait for /health; on failure stop the server and raise ServerStartError with its log tail."""
        try:
            wait_ready(self.url, self.proc, timeout, poll)
        except (RuntimeError, TimeoutError) as e:
            self.stop(10)
            self.kill_group()
            prefix = f"[{self.name}] " if self.name else ""
            raise ServerStartError(f"{prefix}{e}; last lines of {self.log}:\n{self.log_tail(tail)}") from None
        self.startup_s = time.perf_counter() - self.startup_s

    def complete(self, body: dict, timeout: float = 120) -> dict:
        """POST one /v1/completions request; the parsed answer."""
        return post_json(self.url + "/v1/completions", body, timeout=timeout)


def launch(cmd: list[str], log: Path, url: str, env: dict | None = None, *, name: str = "",
           append: bool = False, cwd: Path | str | None = None) -> Server:
    """Start a server without waiting for it (servers can start side by side); output to `log`, in a session of its
    own (its process group can be stopped as one); `cwd`: where relative paths in `cmd` start."""
    out = open(log, "a" if append else "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
    srv = Server(proc, url, Path(log), name)
    srv.startup_s = time.perf_counter()  # the start time until wait_ready() turns it into a duration
    return srv


def start_server(cmd: list[str], log: Path, url: str, env: dict | None = None, *, name: str = "",
                 timeout: float = 300, poll: float = 1.0, tail: int = 40, warmup: dict | None = None,
                 warmup_timeout: float = 120, append: bool = False, cwd: Path | str | None = None) -> Server:
    """launch() and wait_ready(); then, with `warmup`, one /v1/completions request (so that the first measured TTFT is
    not the engine's first-step set-up)."""
    srv = launch(cmd, log, url, env, name=name, append=append, cwd=cwd)
    srv.wait_ready(timeout, poll, tail)
    if warmup is not None:
        try:
            srv.complete(warmup, warmup_timeout)
        except BaseException:
            srv.stop(10)
            raise
    return srv


@contextlib.contextmanager
def serve(cmd: list[str], log: Path, url: str, env: dict | None = None, *, stop_timeout: float = 60,
          stop_group: bool = False, **kw):
    """start_server() (same keywords) for the `with` block, stopped at its end (stop_timeout, stop_group: see
    Server.stop)."""
    srv = start_server(cmd, log, url, env, **kw)
    try:
        yield srv
    finally:
        srv.stop(stop_timeout, group=stop_group)


def lckv_serve_cmd(model: Path | str, port: int, *args: str, host: str | None = HOST) -> list[str]:
    """`lckv-serve MODEL [--host HOST] --port PORT ARGS...` with the venv's console script."""
    return [str(BIN / "lckv-serve"), str(model), *(["--host", host] if host else []), "--port", str(port), *args]


def post_json(url: str, body: dict, api_key: str | None = None, timeout: float = 120) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def sse_events(lines):
    """The JSON events of an OpenAI server-sent-event stream, given its lines as bytes (`response.iter_lines()`), up
    to `data: [DONE]`; keep-alive and other non-data lines are skipped."""
    for line in lines:
        if not line or not line.startswith(b"data: "):
            continue
        if line[6:] == b"[DONE]":
            return
        yield json.loads(line[6:])


# ---- an in-process engine -------------------------------------------------------------------------------------------


def in_process(force: bool = False) -> None:
    """Have vLLM run its engine core in this process (model_of() then reaches the model); call before vLLM starts an
    engine.  `force`: even if the environment says otherwise."""
    if force:
        os.environ[IN_PROCESS] = "0"
    else:
        os.environ.setdefault(IN_PROCESS, "0")


def script_env(force_in_process: bool = False) -> None:
    """What a benchmark script sets before vLLM loads: in-process engines (in_process()), vLLM logging at WARNING and
    single-threaded tokenizers unless the environment says otherwise."""
    in_process(force_in_process)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def offline_engine(path: Path | str, env: dict | None = None, **kw):
    """`vllm.LLM(path, **kw)` with `env` set while it is built (the plugin reads its switches then)."""
    from vllm import LLM

    from .env import temporary_env

    with temporary_env(env):
        return LLM(str(path), **kw)


def model_of(llm):
    """The model object inside an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


# ---- results ---------------------------------------------------------------------------------------------------------


def command_line(module: str, argv: list[str] | None = None) -> str:
    """How a script was run, for its report: `python -m MODULE ARGS`, paths inside the repository made relative."""
    root = str(ROOT) + "/"
    args = [a.replace(root, "") for a in (sys.argv[1:] if argv is None else argv)]
    return " ".join(["python -m", module, *args])


def pyplot():
    """matplotlib's pyplot on the Agg backend: scripts draw their PNGs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path | str, dpi: int = 110) -> Path:
    """Lay out, write and close a figure (a script that draws several must not keep them all open)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def write_results(path: Path | str, report: dict, *, indent: int | None = 2, markdown: str | None = None) -> Path:
    """Write `report` (which carries its "machine" and "command") as JSON to `path`, and `markdown`, if any, beside it
    as .md; folders made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown)
    return path
