"""Choosing an engine's attention path, once, when vLLM builds the model.

`LCKV_ATTENTION_IMPL` (read into `Settings.attention_impl`):
* `auto` (default): Triton on CUDA; on CPU vLLM's own C++ kernels (`cpu_path.py`), or torch for shapes they lack;
* `cpu`: vLLM's CPU kernels made strict; their pages are in the kernels' private format;
* `triton`: the kernels in `lckv_vllm.kernels`, on CUDA or under Triton's interpreter;
* `torch`: the portable gather + SDPA path.
Every layer of a model gets the same path (the page format, hence the vLLM backend class, is engine-wide).  `auto`
falls back to torch for shapes the preferred kernels do not cover, with a log line; an explicit `cpu`/`triton` for
such a shape is an error raised here, at start-up, rather than at the first request.  StreamingLLM mode
(`lckv_streaming`) needs the plain page format (its reads rotate stored keys, `streaming_read.py`): `auto` on CPU
takes the torch path, and an explicit `cpu` is an error.  This is the one module that knows every path, and the one
that maps a path to the vLLM backend class of its page format (`backend_for`).
"""

from __future__ import annotations

import logging

import torch

from lckv_vllm.settings import ATTENTION_IMPL_ENV, Settings
from .backend import BACKENDS
from .base import AttentionPath
from .page_dtype import AUTO, PageDtype

logger = logging.getLogger("lckv_vllm")


def backend_for(path: AttentionPath) -> type:
    """The vLLM attention backend class that declares `path`'s page format (what `Attention(attn_backend=)` gets)."""
    return BACKENDS[path.page_format]


def make_path(name: str, page_dtype: PageDtype = AUTO, dtype: torch.dtype | None = None) -> AttentionPath:
    if name == "cpu":
        from .cpu_path import CpuPath

        return CpuPath(page_dtype, dtype or torch.float32)
    if name == "triton":
        from .triton_path import TritonPath

        return TritonPath(page_dtype)
    if name == "torch":
        from .torch_path import TorchPath

        return TorchPath(page_dtype)
    raise ValueError(f"unknown attention path {name!r}")


def preferred(choice: str, device: torch.device | str | None) -> str:
    """`choice` with `auto` resolved by device alone: Triton on CUDA, vLLM's C++ kernels on CPU."""
    if choice == "auto":
        return "triton" if (device is not None and torch.device(device).type == "cuda") else "cpu"
    return choice


def select_path(settings: Settings, device: torch.device | str | None, head_size: int, num_queries_per_kv: int,
                dtype: torch.dtype | None = None, block_size: int | None = None,
                streaming: bool = False, page_dtype: PageDtype = AUTO) -> AttentionPath:
    """The path a model's layers use for their whole life, storing `page_dtype` in its pages."""
    name = preferred(settings.attention_impl, device)
    problem = None
    if name == "cpu" and streaming:
        problem = "lckv_streaming (keys rotated when read need the plain page format)"
    elif name == "cpu":
        from . import cpu_path

        if device is not None and torch.device(device).type != "cpu":
            problem = f"device {device} (vLLM's CPU kernels run on CPU only)"
        else:
            problem = cpu_path.unsupported_reason(head_size, dtype, block_size, page_dtype)
    elif name == "triton":
        from . import triton_path

        problem = triton_path.unsupported_reason(head_size, num_queries_per_kv, page_dtype)
    if problem is None:
        return make_path(name, page_dtype, dtype)
    if settings.attention_impl == name:
        raise ValueError(f"{ATTENTION_IMPL_ENV}={name}: the {name} attention kernels do not support {problem}")
    logger.info("LCKV attention: the %s kernels do not support %s; using the torch path", name, problem)
    return make_path("torch", page_dtype, dtype)
