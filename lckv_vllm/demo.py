"""`make demo`: build the small default LCKV model, serve it with `vllm serve`, answer one HTTP completion, stop.

Uses the real `vllm` console script of the venv (repaired by `lckv-vllm doctor --fix` on the CPU wheel), so it
also shows that a plain `vllm serve MODEL` picks the plugin up through its entry point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_PRESET = "tiny-w2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
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


def main() -> int:
    from .checkpoint import make_preset

    model = Path(os.environ.get("LCKV_DEMO_MODEL", f"models/{DEFAULT_PRESET}"))
    if not (model / "config.json").exists():
        print(f"building {DEFAULT_PRESET} into {model} ...", flush=True)
        make_preset(DEFAULT_PRESET, model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    vllm = Path(sys.executable).parent / "vllm"
    cmd = [str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--served-model-name", "lckv-demo"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    print("$", " ".join(cmd), flush=True)
    log = open("demo-server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(url, proc)
        body = {"model": "lckv-demo", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
        print(f"$ curl {url}/v1/completions -d '{json.dumps(body)}'", flush=True)
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        print(json.dumps(answer, indent=2))
        print("(a random-weight model: the text is noise; the point is the path: vllm serve -> plugin -> LCKV)")
        ok = bool(answer["choices"][0]["text"]) and answer["usage"]["completion_tokens"] == 16
        return 0 if ok else 1
    except Exception as e:
        print(f"demo failed: {e}; server log: demo-server.log", file=sys.stderr)
        return 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
