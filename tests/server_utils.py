"""Helpers for the HTTP server tests: start a server subprocess on a free loopback port, wait for it, read its
/metrics, and stop it with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lckv_vllm.tools.harness import free_port, log_tail, parse_metrics, stop_process  # noqa: F401  (re-exported)

BIN = Path(sys.executable).parent


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
        return log_tail(self.log, n)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the server (not its process group: the server must clean up its engine itself)."""
        return stop_process(self.proc, timeout)

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


class StubEngine:
    """Just enough of AsyncLLM for the server, in-process: fails requests whose prompt contains 'FAIL' (one
    request, the engine lives on), dies on 'DIE' (the engine is gone)."""

    def __init__(self, tokenizer, max_model_len: int = 512):
        from types import SimpleNamespace

        import torch

        self.tokenizer = tokenizer
        self.dead = False
        hf_config = SimpleNamespace(layer_types="0_4_4_4_4_5", num_hidden_layers=6)
        self.model_config = SimpleNamespace(
            max_model_len=max_model_len, max_logprobs=20, hf_config=hf_config, dtype=torch.float32,
            get_vocab_size=lambda: 32000, get_diff_sampling_param=lambda: {},
            get_num_kv_heads=lambda parallel_config: 2, get_head_size=lambda: 32)
        self.vllm_config = SimpleNamespace(
            model_config=self.model_config, parallel_config=None,
            scheduler_config=SimpleNamespace(max_num_seqs=4),
            cache_config=SimpleNamespace(num_gpu_blocks=10, block_size=16, cache_dtype="auto"))

    @property
    def errored(self):
        return self.dead

    def get_tokenizer(self):
        return self.tokenizer

    def get_num_unfinished_requests(self):
        return 0

    async def abort(self, request_id):
        pass

    async def generate(self, prompt, params, request_id):
        from types import SimpleNamespace

        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        text = self.tokenizer.decode(prompt["prompt_token_ids"])
        if "DIE" in text:
            self.dead = True
            raise EngineDeadError()
        if "FAIL" in text:
            try:
                raise RuntimeError("simulated kernel failure")
            except RuntimeError as e:
                raise EngineGenerateError() from e
        yield SimpleNamespace(prompt_logprobs=None, finished=True, outputs=[SimpleNamespace(
            index=0, text=" fine", token_ids=[1234], logprobs=None, finish_reason="length", stop_reason=None)])
