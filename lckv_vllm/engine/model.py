"""`LCKVLlamaForCausalLM` for vLLM: Llama whose layers read the KVs of the layer `layer_types` names.

Structure mirrors vLLM's `llama.py` (MLP → attention → decoder layer → model → causal LM) and uses vLLM's parallel
layers, so module and weight names match the official checkpoints.  What differs, all derived from the `LayerPlan`:

* a layer that computes KV has the fused `qkv_proj`; a layer that does not has only `q_proj` (the checkpoint has no
  k/v weights for it);
* only producers own KV pages: a non-producer's `Attention` is bound to its producer through vLLM's KV-sharing
  mechanism, so vLLM's block manager counts producers only;
* each layer writes its own pages (if it computes KV) and reads the pages of the layer it attends to, strictly
  causal where the plan says so: the attention op calls the layer's `LCKVAttentionImpl.run` (attention/backend.py)
  with the engine's attention path (`attention/chooser.py`, chosen once);
* `LCKVModel.forward` walks the plan's segments (`segments.py`: compiled units, producers) and hands each to the
  prefill (`prefill.py`), which owns the pass loop: a cyclic segment runs up to `plan.prefill_passes(longest query
  in the step)` passes from zeroed producer slots, stopping per sequence once its K/V stop moving; after k passes
  the first k tokens of every prompt are exact, and decode steps (one token each) need a single pass;
* a step that re-encodes generated tokens (recompute after preemption, speculative verify steps) runs cyclic
  segments part by part so the result equals the original prompt-then-decode encoding (`resume.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import direct_register_custom_op

from . import resume
from . import vllm_patches as vp
from .attention.base import AttentionPath
from .attention.chooser import backend_for, select_path
from .attention.page_dtype import page_dtype_of
from .attention.context import kv_connector, link_step_groups, step_metadata
from .attention.streaming_read import StreamingRead
from .lora import AdapterRows
from ..plan import LayerPlan, plan_from_config
from .prefill import IterativePrefill
from .segments import build_segments
from .startup import pp_layer_partition
from ..settings import Settings, load_settings
from ..rope import rope_theta

logger = logging.getLogger("lckv_vllm")


def _attn_name(prefix: str, layer: int) -> str:
    return f"{prefix}.layers.{layer}.self_attn.attn"


def _lckv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    """One layer's attention step, `layer.impl.run` (attention/backend.py), as vLLM's own ops call `layer.impl`.

    Registered as the custom op `vllm::lckv_attention` and listed among vLLM's splitting ops, so torch.compile
    compiles everything between attention calls and runs this opaque, eagerly, with the step's metadata.
    """
    layers = get_forward_context().no_compile_layers
    layer = layers[layer_name]
    layer.impl.run(layer, layers, q, k, v, output)


def _lckv_attention_fake(q, k, v, output, layer_name: str) -> None:
    return None


direct_register_custom_op("lckv_attention", _lckv_attention, mutates_args=["output"],
                          fake_impl=_lckv_attention_fake)
assert vp.LCKV_ATTENTION_OP == "vllm::lckv_attention"  # the name vLLM's compiler splits at (vllm_patches item 3)


class LCKVAttention(nn.Module):
    def __init__(self, config, plan: LayerPlan, layer_idx: int, vllm_config: VllmConfig, model_prefix: str,
                 prefix: str, path: AttentionPath, windowed_pages: bool = True,
                 streaming: StreamingRead | None = None):
        super().__init__()
        role = plan.roles[layer_idx]
        self.role = role
        tp = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        assert self.total_num_heads % tp == 0
        if self.total_num_kv_heads >= tp:
            assert self.total_num_kv_heads % tp == 0
        else:
            assert tp % self.total_num_kv_heads == 0
        self.num_heads = self.total_num_heads // tp
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        bias = getattr(config, "attention_bias", False)
        quant_config = vllm_config.quant_config

        if role.computes_kv:
            self.qkv_proj = QKVParallelLinear(hidden_size=config.hidden_size, head_size=self.head_dim,
                                              total_num_heads=self.total_num_heads,
                                              total_num_kv_heads=self.total_num_kv_heads, bias=bias,
                                              quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        else:
            self.q_proj = ColumnParallelLinear(
                config.hidden_size,
                self.total_num_heads * self.head_dim,
                bias=bias,
                quant_config=quant_config,
                prefix=f"{prefix}.q_proj",
            )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        self.path = path
        # A producer whose every reader is sliding-window gets sliding-window pages (vLLM frees what falls out of
        # the window); every other layer full-attention pages, the window applied on read (vllm_patches item 6).
        page_window = None
        if role.computes_kv and windowed_pages:
            page_window = plan.page_window(layer_idx)
        # Built without a sharing target: a consumer's producer may be a later layer, which vLLM's constructor-time
        # check rejects.  The model binds consumers to their producers once every layer exists.
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=vp.full_attention_cache_config(vllm_config.cache_config),
            per_layer_sliding_window=page_window,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_backend=backend_for(path),
            lckv_path=path,
            lckv_strict=role.strict,
            lckv_window=plan.window(layer_idx),
            lckv_read_name=_attn_name(model_prefix, role.attends_to),
            lckv_computes_kv=role.computes_kv,
            lckv_streaming=streaming,
        )
        if page_window is not None and plan.streaming is not None:
            vp.use_sink_window_pages(self.attn, plan.streaming.sink_tokens)
        self.own_name = f"{prefix}.attn"
        self.streaming = streaming
    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.role.computes_kv:
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            if self.streaming is None:  # streaming: keys are stored unrotated, rotated when read
                q, k = self.rotary_emb(positions, q, k)
        else:
            q, _ = self.q_proj(hidden_states)
            if self.streaming is None:
                q, _ = self.rotary_emb(positions, q, None)
            k = v = q  # unused: this layer writes no K/V
        out = torch.empty_like(q)
        torch.ops.vllm.lckv_attention(q, k, v, out, self.own_name)
        output, _ = self.o_proj(out)
        return output

    def write_kv(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Only this producer's K/V write (eager, outside compiled units): a non-final prefill pass (prefill.py)."""
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.streaming is None:  # streaming stores keys unrotated (as `forward`)
            _, k = self.rotary_emb(positions, q, k)
        step = step_metadata(self.attn.impl.read_name)
        self.attn.impl.write_own_kv(self.attn, step, k, v, step.num_actual_tokens)


class LCKVDecoderLayer(nn.Module):
    def __init__(self, config, plan: LayerPlan, layer_idx: int, vllm_config: VllmConfig, model_prefix: str,
                 path: AttentionPath, windowed_pages: bool = True, streaming: StreamingRead | None = None):
        super().__init__()
        prefix = f"{model_prefix}.layers.{layer_idx}"
        self.self_attn = LCKVAttention(config, plan, layer_idx, vllm_config, model_prefix, f"{prefix}.self_attn", path,
                                       windowed_pages, streaming)
        self.mlp = LlamaMLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=vllm_config.quant_config,
            bias=getattr(config, "mlp_bias", False),
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def write_kv(self, positions, hidden_states) -> None:
        """This layer's K/V of `hidden_states` (its input, residual folded in), nothing else."""
        self.self_attn.write_kv(positions, self.input_layernorm(hidden_states))

    def forward(self, positions, hidden_states, residual, skip_read: bool = False):
        if skip_read:
            # The first pass of a block without context, in a layer that reads a producer above it: every key and
            # value it could see is a zeroed slot, so its attention output is exactly 0 (uniform weights over zero
            # values; nothing visible: 0 by definition) and o_proj(0) = 0.  Only the residual and the MLP remain.
            residual = hidden_states if residual is None else hidden_states + residual
            return self.mlp(self.post_attention_layernorm(residual)), residual
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LCKVModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model"):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.plan = plan_from_config(config)
        self.settings: Settings = load_settings(config)
        self.path = _select_path(self.settings, config, vllm_config, streaming=self.plan.streaming is not None)
        self.streaming = None
        if self.plan.streaming is not None:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            self.streaming = StreamingRead(self.plan.streaming, head_dim, rope_theta(config))
        # Pipeline parallelism: this stage's layers, cut only where no reader is separated from its producer
        # (plan.pipeline_stages); the other layers are placeholders without weights or pages.
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.start_layer, self.end_layer = self.plan.pipeline_stages(pp.world_size, pp_layer_partition())[
            pp.rank_in_group]
        if not self.is_first_stage:
            vp.install_intermediate_tensors_fix()
        if self.is_first_stage or (config.tie_word_embeddings and self.is_last_stage):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       quant_config=vllm_config.quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.layers = nn.ModuleList(
            LCKVDecoderLayer(config, self.plan, i, vllm_config, prefix, self.path, self.settings.windowed_pages,
                             self.streaming)
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.is_last_stage else PPMissingLayer()
        self._bind_consumers(vllm_config, prefix)
        units = build_segments(self.plan, self.layers, self.start_layer, self.end_layer, vllm_config, prefix,
                               adaptive=self.settings.adaptive)
        object.__setattr__(self, "segments", units)  # not submodules: they own no weights (the layers do)
        # the step's metadata is looked up under one of this stage's producers (every stage has one)
        self.step_layer = _attn_name(prefix, next(p for p in self.plan.producers
                                                  if self.start_layer <= p < self.end_layer))
        # Re-encode preempted requests exactly (resume.py).  Acyclic plans are exact under any split anyway.  A
        # speculative verify step is the same situation (k+1 tokens after the prompt in one step), so speculative
        # decoding always takes the exact path: otherwise its output would depend on how many drafts were accepted.
        self.exact_recompute = self.plan.is_cyclic and (self.settings.exact_recompute
                                                        or vllm_config.speculative_config is not None)
        if self.exact_recompute:
            vp.install_prompt_lengths_hook()
        tp_reduce = tensor_model_parallel_all_reduce if get_tensor_model_parallel_world_size() > 1 else None
        adapters = None
        if vllm_config.lora_config is not None:  # vLLM wraps the layers after construction (lora.py)
            adapters = AdapterRows(self)
            vp.install_cpu_lora_fix()
        self.prefill = IterativePrefill(self.plan, self.settings, tp_reduce, adapters)

    def _bind_consumers(self, vllm_config: VllmConfig, prefix: str) -> None:
        """Point each non-producing layer's `Attention` at its producer's pages (vLLM KV sharing).

        vLLM then allocates no pages for it and binds the producer's cache tensor to it.  Done after construction
        because the producer is often a later layer (vllm_patches item 5); the plan guarantees targets are producers
        (no chains).
        """
        static_ctx = vllm_config.compilation_config.static_forward_context
        for r in self.plan.roles:
            if not r.computes_kv and self.start_layer <= r.index < self.end_layer:
                vp.bind_kv_sharing(self.layers[r.index].self_attn.attn, _attn_name(prefix, self.plan.kv_owner(r.index)),
                                   static_ctx)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if not self.is_first_stage:
            hidden = intermediate_tensors["hidden_states"]
        else:
            hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        step = step_metadata(self.step_layer)
        if step is None:  # vLLM's warm-up and profiling runs: every unit once (compiled mode compiles them here)
            for units in self.segments:
                hidden = units.warm_up(positions, hidden)
        else:
            hidden = self._step(positions, hidden, step)
        if not self.is_last_stage:
            return IntermediateTensors({"hidden_states": hidden})
        return self.norm(hidden)

    def _step(self, positions, hidden, step):
        """The segments in order, each run by the prefill (once, or iteratively for a cyclic segment)."""
        link_step_groups()
        parts = resume.plan_step(step, self.plan) if self.exact_recompute else None
        record = self.prefill.begin_step(step)
        connector, waited = kv_connector(), set()
        for units in self.segments:
            if connector is not None:
                units.wait_for_kv(connector, waited)
            hidden = self.prefill.run(units, positions, hidden, step, record, parts)
            if connector is not None:
                units.save_kv(connector)
        self.prefill.finish_step(step, record, resume.generated_only(step) if parts is not None else None)
        return hidden


def _select_path(settings: Settings, config, vllm_config: VllmConfig, streaming: bool = False) -> AttentionPath:
    """The engine's attention path, from model-wide shapes only, so every layer (and the page format) agrees."""
    tp = get_tensor_model_parallel_world_size()
    num_heads = config.num_attention_heads // tp
    num_kv_heads = max(1, config.num_key_value_heads // tp)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return select_path(settings, vllm_config.device_config.device, head_dim, num_heads // num_kv_heads,
                       vllm_config.model_config.dtype, vllm_config.cache_config.block_size, streaming=streaming,
                       page_dtype=page_dtype_of(vllm_config.cache_config.cache_dtype))


class LCKVLlamaForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    # LoRA: vLLM wraps producers' qkv_proj, consumers' q_proj and the MLPs by these names; an adapter's k/v weights
    # for a layer that computes no KV under the plan have nothing to apply to (as the layer's own k/v weights)
    embedding_modules = {"embed_tokens": "input_embeddings", "lm_head": "output_embeddings"}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        # `prefix` is where vLLM mounts this model ("" for the served model, "draft_model" for a speculative draft):
        # layer names, and so the KV-sharing targets and metadata lookups, must carry it or two models collide
        self.model = LCKVModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.plan = self.model.plan
        # Read by the model-runner hook (vllm_patches.py, item 4): publish each step's prompt lengths.
        self.lckv_needs_prompt_lens = self.model.exact_recompute
        if self.model.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        logger.info(
            "LCKV plan %s: %d of %d layers keep KV; segments %s; attention path %s",
            self.plan.layer_types,
            len(self.plan.producers),
            self.plan.num_layers,
            [(s.start, s.end, "cyclic" if s.cyclic else "once") for s in self.plan.segments],
            self.model.path.name,
        )
        original = getattr(config, "layer_types_overridden_from", None)
        if original is not None:
            logger.warning("LCKV: serving layer_types %s (override), not the checkpoint's %s: %d instead of %d "
                           "layers keep KV", self.plan.layer_types, original, len(self.plan.producers),
                           len({entry.rstrip("s") for entry in original.split("_")}))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype,
                                        device: torch.device) -> IntermediateTensors:
        """What a later pipeline stage receives: the hidden states (the residual is folded into them)."""
        return IntermediateTensors(
            {"hidden_states": torch.zeros(batch_size, self.config.hidden_size, dtype=dtype, device=device)})

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor):
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from .weights import load_lckv_weights

        return load_lckv_weights(self, weights)
