"""Helpers shared by the reliability scripts (fuzz.py, storm.py, soak.py): start lckv-serve on a tiny model on a free
loopback port, wait for it, read /metrics, stop it with SIGTERM.  Loopback only: every URL these scripts build is
http://127.0.0.1:PORT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lckv_vllm.tools.harness import free_port, log_tail, read_metrics, stop_process, wait_ready

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def model_path(spec: str, tmp: Path) -> Path:
    """A checkpoint directory, or a preset name built into `tmp`."""
    from lckv_vllm.tools.checkpoint import PRESETS, make_preset

    if spec in PRESETS:
        return make_preset(spec, tmp / spec)
    path = Path(spec)
    if not (path / "config.json").exists():
        raise SystemExit(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    return path


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log, n)

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url)

    def stop(self, timeout: float = 60) -> int:
        return stop_process(self.proc, timeout)


def start_server(path: Path, log: Path, *, name: str = "tiny", api_key: str | None = None,
                 extra: list[str] = (), timeout: float = 300) -> Server:
    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = [str(BIN / "lckv-serve"), str(path), "--host", HOST, "--port", str(port), "--served-model-name", name,
           "--dtype", "float32", "--block-size", "16", *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if api_key:
        env["LCKV_API_KEY"] = api_key
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(proc, url, log)
    try:
        wait_ready(url, proc, timeout)
    except (RuntimeError, TimeoutError) as e:
        srv.stop(10)
        raise SystemExit(f"lckv-serve: {e}:\n{srv.log_tail()}") from None
    return srv


def post_json(url: str, body: dict, api_key: str | None = None, timeout: float = 120) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def machine() -> dict:
    import platform

    import vllm

    import lckv_vllm

    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "python": platform.python_version(), "vllm": vllm.__version__, "lckv_vllm": lckv_vllm.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def command_args(argv: list[str] | None) -> list[str]:
    """The script's arguments for the report, with paths inside the repository made relative to it."""
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return [a.replace(root, "") for a in (argv if argv is not None else sys.argv[1:])]
