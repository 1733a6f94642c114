"""The config hook: what the plugin checks and changes while vLLM builds its `VllmConfig`, before any weight is read.

vLLM runs `LCKVConfigHook.verify_and_update_config` for the `LCKVLlamaForCausalLM` architecture (registered by
`vllm_patches.install_config_hook`).  In order:
1. GPUs run eagerly (no CUDA graphs: graph capture of a step whose pass count depends on the data is untested)
   and without async scheduling (vLLM's GPU default; overlapping steps are untested);
2. several CPU workers (tensor / pipeline parallel) get an explicit core split unless the user chose one: vLLM's
   "auto" binding wants one NUMA node per worker and refuses otherwise, while "0|1" on two cores serves correctly;
3. `layer_types` and the LCKV_* switches are validated (errors name the field or variable);
4. the feature guard (`features.check`) refuses every vLLM switch the plan does not support, naming it;
5. StreamingLLM mode turns prefix caching off (a hit would need the sink pages too);
6. for a cyclic plan with `LCKV_CHUNKED_PREFILL=0` (or `--hf-overrides '{"lckv_chunked_prefill": false}'`),
   whole-prompt prefill is forced (no chunked prefill, no prefix-cache reuse): beyond m+b tokens the iterative
   encoding of a checkpoint that does not converge depends on how a prompt is split into steps
   (docs/semantics.md).  By default chunked prefill and prefix caching stay as vLLM configures them.
Workers are spawned after the hook and inherit what it set.
"""

from __future__ import annotations

import logging
import os

from . import features
from ..settings import CHUNKED_PREFILL_ENV, load_settings

logger = logging.getLogger("lckv_vllm")


class LCKVConfigHook:
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        from ..plan import LayerPlanError, plan_from_config

        hf_config = vllm_config.model_config.hf_config
        try:
            plan = plan_from_config(hf_config)
        except LayerPlanError as e:
            raise ValueError(f"invalid LCKV checkpoint config ({vllm_config.model_config.model}): {e}") from None
        settings = load_settings(hf_config)  # a bad LCKV_* value fails here, naming the variable
        features.check(vllm_config, plan, settings, logger)  # refuses what the plan cannot serve, naming it
        if not current_platform.is_cpu() and not vllm_config.model_config.enforce_eager:
            # CUDA graphs of a segment that runs a data-dependent number of passes per step are untested, so GPUs
            # run eagerly (vLLM maps this to compilation mode NONE and no CUDA graphs).  On CPU, vLLM's
            # torch.compile compiles each segment between our attention ops (vllm_patches item 3).
            vllm_config.model_config.enforce_eager = True
            logger.warning("LCKV: enforce_eager=True on %s: no CUDA graphs (graph capture of the iterative prefill "
                           "is untested; docs/features.md)", current_platform.device_name)
        if not current_platform.is_cpu() and vllm_config.scheduler_config.async_scheduling is None:
            # vLLM turns async scheduling on by default on GPUs (later in its config's set-up); steps that overlap
            # with the iterative prefill and the exact re-encoding are untested, so the default becomes off (an
            # explicit --async-scheduling was refused by the guard above).
            vllm_config.scheduler_config.async_scheduling = False
            logger.warning("LCKV: async scheduling off on %s (untested with LCKV plans; docs/features.md)",
                           current_platform.device_name)
        if current_platform.is_cpu():
            _bind_cpu_workers(vllm_config.parallel_config)
        if plan.streaming is not None and vllm_config.cache_config.enable_prefix_caching:
            # a cached prefix would have to bring its sink blocks along; the sink-window manager reports no hits
            vllm_config.cache_config.enable_prefix_caching = False
            logger.info("LCKV: %s: prefix caching off (the sink pages cannot come from a cached prefix)",
                        plan.streaming.describe())
        if not plan.is_cyclic or settings.chunked_prefill:
            if plan.is_cyclic:
                logger.info(
                    "LCKV: cyclic plan: chunked prefill and prefix caching as vLLM configures them; a prompt split "
                    "across steps is encoded chunk by chunk (equal to whole-prompt encoding for a checkpoint that "
                    "converges; %s=0 forces whole-prompt prefill); adaptive passes, tolerance %g",
                    CHUNKED_PREFILL_ENV, settings.prefill_tol if settings.adaptive else 0.0)
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
            "LCKV: cyclic layer plan, %s=0 -> whole-prompt prefill (%s) so a prompt's output does not depend on "
            "how the scheduler splits it",
            CHUNKED_PREFILL_ENV,
            ", ".join(changed) or "already so",
        )


def _bind_cpu_workers(parallel_config) -> None:
    """Split the allowed CPUs into one contiguous group per local worker, unless the user chose a binding."""
    workers = parallel_config.tensor_parallel_size * parallel_config.pipeline_parallel_size
    if workers <= 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        return  # vLLM's own message explains it better than a binding we cannot make
    per = len(cpus) // workers
    groups = [cpus[k * per:(k + 1) * per] for k in range(workers)]
    binding = "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    logger.info("LCKV: %d CPU workers: VLLM_CPU_OMP_THREADS_BIND=%s (set it yourself to choose)", workers, binding)


def pp_layer_partition() -> list[int] | None:
    """Layers per pipeline stage asked for with `VLLM_PP_LAYER_PARTITION` (vLLM's own switch), or None.  The model
    validates it against the plan (`LayerPlan.pipeline_stages`) instead of letting vLLM cut anywhere."""
    import vllm.envs as envs

    raw = envs.VLLM_PP_LAYER_PARTITION
    if not raw:
        return None
    try:
        return [int(x) for x in raw.split(",")]
    except ValueError:
        raise ValueError(f"VLLM_PP_LAYER_PARTITION={raw!r}: expected comma-separated layer counts") from None
