"""lckv-vllm: serve cross-layer KV-sharing models (LCKV, CLA, YOCO, ...) with vLLM.

`register()` is the plugin's one entry point (entry-point group `vllm.general_plugins`).  vLLM calls it in every
process it starts, so it is idempotent and cheap: it registers the HF config class for `model_type: "lckv-llama"`,
the model architecture (lazily, by module path) and the attention backend, the config hook that forces
whole-prompt prefill for cyclic plans, and the KV spec of StreamingLLM mode's sink + window pages; with `LCKV_ATTENTION_IMPL=triton` on a machine without CUDA it also turns on
Triton's interpreter (`TRITON_INTERPRET=1`) for the process.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM = "0.32"
__version__ = "0.1.0"

logger = logging.getLogger("lckv_vllm")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    import vllm

    from .config import ARCHITECTURE, register_hf_config

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM + "."):
        logger.warning(
            "lckv-vllm supports vLLM %s.x; the installed vLLM is %s. The plugin reaches into vLLM's attention "
            "backend and config hooks, which change between minor versions: expect failures.",
            SUPPORTED_VLLM,
            version,
        )

    register_hf_config()

    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "lckv_vllm.engine.model:LCKVLlamaForCausalLM")

    from vllm.v1.attention.backends.registry import register_backend

    from .engine.attention.backend import BACKEND_NAME, CPU_BACKEND_NAME

    register_backend(BACKEND_NAME, "lckv_vllm.engine.attention.backend.LCKVAttentionBackend")
    register_backend(CPU_BACKEND_NAME, "lckv_vllm.engine.attention.backend.LCKVCpuAttentionBackend")

    from .engine.sink_window_pages import register_sink_window_pages
    from .engine.vllm_patches import install_config_hook

    install_config_hook()
    register_sink_window_pages()

    # LCKV_ATTENTION_IMPL=triton without a GPU: the kernels can only run under Triton's interpreter, which must be
    # switched on before the kernel module is imported (lazily, at the first LCKV layer) in this process.
    from .engine.attention.triton_path import use_interpreter_if_needed

    use_interpreter_if_needed()
