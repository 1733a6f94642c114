"""lckv_vllm.tools.harness without vLLM: serve() on a stand-in HTTP server (readiness, warm-up, stop), the log tail
on a server that dies, and the result writer."""

from __future__ import annotations

import json
import sys

import pytest

from lckv_vllm.tools.harness import ServerStartError, command_line, free_port, serve, write_results

STUB = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class H(BaseHTTPRequestHandler):
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print("completion", body["prompt"], flush=True)
        self._send({"choices": [{"text": "ok"}]})

print("listening", flush=True)
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_serve_waits_warms_up_and_stops(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with serve([sys.executable, "-c", STUB, str(port)], log, f"http://127.0.0.1:{port}", timeout=30, poll=0.1,
               warmup={"prompt": "warm up", "max_tokens": 2}, stop_timeout=10) as srv:
        assert srv.startup_s > 0
        assert srv.complete({"prompt": "again"})["choices"][0]["text"] == "ok"
        proc = srv.proc
    assert proc.poll() is not None  # stopped at the end of the block
    assert "completion warm up" in log.read_text() and "completion again" in log.read_text()


def test_a_server_that_dies_reports_its_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "print('bad flag --nope'); raise SystemExit(3)"]
    with pytest.raises(ServerStartError, match=r"(?s)\[x\] server exited with code 3.*bad flag --nope"):
        with serve(cmd, tmp_path / "server.log", f"http://127.0.0.1:{free_port()}", name="x", timeout=30, poll=0.1):
            pass


def test_write_results(tmp_path):
    path = write_results(tmp_path / "a" / "r.json", {"command": command_line("benchmarks.x", ["--n", "2"])},
                         indent=1, markdown="# r\n")
    assert json.loads(path.read_text()) == {"command": "python -m benchmarks.x --n 2"}
    assert path.read_text().endswith("}\n") and (tmp_path / "a" / "r.md").read_text() == "# r\n"
