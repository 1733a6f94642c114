"""Helpers for the HTTP server tests: start a server subprocess on a free loopback port and wait for it (through
lckv_vllm.tools.harness, as the benchmarks and load tests do), read its /metrics, stop it with SIGTERM; load a
checkpoint's tokenizer; a stand-in engine for in-process checks."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lckv_vllm.tools.harness import BIN, Server, free_port, parse_metrics, server_env
from lckv_vllm.tools.harness import start_server as _start

__all__ = ["BIN", "Server", "StubEngine", "free_port", "lckv_serve", "load_tokenizer", "parse_metrics", "server_env",
           "start_server"]


def start_server(cmd: list[str], log: Path, env: dict, port: int, timeout: float = 240) -> Server:
    """The server of `cmd` (listening on 127.0.0.1:`port`), ready; on failure the error carries its log tail."""
    return _start(cmd, log, f"http://127.0.0.1:{port}", env, timeout=timeout, poll=0.5, tail=60)


def lckv_serve(model_path: Path, log: Path, served_name: str, args: list[str], env: dict) -> Iterator[Server]:
    """A module's lckv-serve subprocess, for its fixture to `yield from`: `model_path` served as `served_name` on a
    free loopback port with `args` (lckv-serve's own flags and vLLM's engine arguments); stopped (SIGTERM, then
    what is left of its process group killed) when the fixture is torn down."""
    port = free_port()
    cmd = [str(BIN / "lckv-serve"), str(model_path), "--port", str(port), "--served-model-name", served_name, *args]
    srv = start_server(cmd, log, env, port)
    yield srv
    srv.stop()
    srv.kill_group()


def load_tokenizer(model_path: Path):
    """The checkpoint's tokenizer (the plugin is registered first: it teaches AutoConfig the "lckv-llama" type)."""
    import lckv_vllm

    lckv_vllm.register()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


class StubEngine:
    """Just enough of AsyncLLM for the server, in-process: fails requests whose prompt contains 'FAIL' (one
    request, the engine lives on), dies on 'DIE' (the engine is gone)."""

    def __init__(self, tokenizer, max_model_len: int = 512):
        from types import SimpleNamespace

        import torch

        self.tokenizer = tokenizer
        self.dead = False
        self.loras: list = []  # the LoRA adapter name of each request (None: the base model)
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

    async def generate(self, prompt, params, request_id, lora_request=None):
        from types import SimpleNamespace

        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        self.loras.append(lora_request.lora_name if lora_request is not None else None)
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
