"""Helpers shared by the reliability scripts (fuzz.py, storm.py, soak.py): start lckv-serve on a tiny model on a free
loopback port, wait for it, read /metrics, stop it with SIGTERM (all through lckv_vllm.tools.harness).  Loopback
only: every URL these scripts build is http://127.0.0.1:PORT."""

from __future__ import annotations

from pathlib import Path

from lckv_vllm.tools.harness import (HOST, Server, ServerStartError, command_line, free_port, lckv_serve_cmd,
                                     machine as describe, post_json, read_metrics, server_env,
                                     write_results)

__all__ = ["command_line", "machine", "model_path", "post_json", "read_metrics", "start_server",
           "write_results"]


def model_path(spec: str, tmp: Path) -> Path:
    """A checkpoint directory, or a preset name built into `tmp`."""
    from lckv_vllm.tools.checkpoint import PRESETS, make_preset

    if spec in PRESETS:
        return make_preset(spec, tmp / spec)
    path = Path(spec)
    if not (path / "config.json").exists():
        raise SystemExit(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    return path


def start_server(path: Path, log: Path, *, name: str = "tiny", api_key: str | None = None,
                 extra: list[str] = (), timeout: float = 300) -> Server:
    from lckv_vllm.tools.harness import start_server as start

    port = free_port()
    cmd = lckv_serve_cmd(path, port, "--served-model-name", name, "--dtype", "float32", "--block-size", "16", *extra)
    env = server_env(TOKENIZERS_PARALLELISM="false", **({"LCKV_API_KEY": api_key} if api_key else {}))
    try:
        return start(cmd, log, f"http://{HOST}:{port}", env, timeout=timeout)
    except ServerStartError as e:
        raise SystemExit(f"lckv-serve: {e}") from None


def machine() -> dict:
    """The load tests' machine description (the short form their committed reports have)."""
    return describe(short=True)
