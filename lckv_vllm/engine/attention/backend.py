"""The plugin's vLLM attention backend: metadata builder, page layout and the per-layer entry points.

Why a backend of our own: vLLM's backends cannot express "a query must not see its own, not-yet-computed KV"
(strict causal attention into another layer's pages).  Two page formats, one backend class each, chosen by the
chooser from the path's page format (`BACKENDS`):
* `LCKVAttentionBackend` (torch and Triton paths): plain slots `[num_blocks * block_size, num_kv_heads,
  2 * head_size]`, K in the first half of the last axis and V in the second (vLLM's LBNHC physical layout:
  token-major pages);
* `LCKVCpuAttentionBackend` (the `cpu` path, vLLM's own C++ kernels made strict, see `cpu_path.py`): the format those
  kernels own (head-major blocks, LBHNC, K transposed inside a block).  vLLM resolves one layout per engine from the
  backends' declarations, which is why the format is a property of the class, not of a call.

The metadata builder makes the step object (`step.LCKVStep`) every layer reads.  The model does not go through
`Attention.forward` (which reads and writes one layer's cache): its op calls `LCKVAttentionImpl.run`, which writes
the layer's own pages when it computes KV and reads the pages of the layer it attends to, which may be a different
producer, through the engine's attention path (`base.AttentionPath`).  This module imports no path.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from .context import step_metadata
from .step import LCKVStep, StepBuffers, make_step


BACKEND_NAME = "LCKV_ATTN"  # the names `register()` registers the two classes under
CPU_BACKEND_NAME = "LCKV_CPU_ATTN"  # same backend, pages in the format of vLLM's CPU kernels
# vLLM's CPU kernels check the block size (vec16 variant: a multiple of 16, others 32; vLLM's CPU_ATTN asks for 32)
CPU_BLOCK_SIZE_MULTIPLE = 16


class LCKVAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    accept_output_buffer: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # fp8: the paths' `page_dtype` (page_dtype.py); the start-up guard (features.py) decides what is served
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32", "fp8", "fp8_e4m3",
                                                 "fp8_e5m2"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any head size: the torch path has no constraint, the Triton path checks its own

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Token-major pages: one slot's [num_kv_heads, 2 * head_size] is contiguous, so a slot index addresses it.
        return (KVCacheLayout.LBNHC,)

    @staticmethod
    def get_impl_cls() -> type["LCKVAttentionImpl"]:
        return LCKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["LCKVMetadataBuilder"]:
        return LCKVMetadataBuilder


class LCKVCpuAttentionBackend(LCKVAttentionBackend):
    """Same backend, pages in the format of vLLM's CPU attention kernels (the `cpu` implementation)."""

    @staticmethod
    def get_name() -> str:
        return CPU_BACKEND_NAME

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(CPU_BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # vLLM's CPU kernels read head-major blocks: [num_blocks, num_kv_heads, block_size, 2 * head_size].
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_impl_cls() -> type["LCKVCpuAttentionImpl"]:
        return LCKVCpuAttentionImpl


class LCKVMetadataBuilder(AttentionMetadataBuilder[LCKVStep]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.buffers = StepBuffers(vllm_config.scheduler_config.max_num_seqs, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> LCKVStep:
        m = common_attn_metadata
        return make_step(
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            num_reqs=m.num_reqs,
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc_cpu=m.query_start_loc_cpu,
            seq_lens_cpu=getattr(m, "seq_lens_cpu", None),
            buffers=self.buffers,
        )


class LCKVAttentionImpl(AttentionImpl[LCKVStep]):
    """The one object that describes a layer's attention: built by vLLM's `Attention` from the `lckv_*` arguments
    the model passes (its flags, the layer it reads, the engine's attention path, the streaming read).

    `run` is the LCKV attention op (`vllm::lckv_attention`, model.py): write the layer's own K/V if it computes KV,
    read the pages of the layer it attends to.  `forward` / `do_kv_cache_update` serve a caller that goes through
    vLLM's `Attention.forward` (own pages only).
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        lckv_path=None,
        lckv_strict: bool = False,
        lckv_window: int | None = None,
        lckv_read_name: str | None = None,
        lckv_computes_kv: bool = True,
        lckv_streaming=None,
    ) -> None:
        if alibi_slopes is not None or (logits_soft_cap or 0) != 0:
            raise NotImplementedError("the LCKV attention backend supports neither ALiBi nor logit soft-capping")
        if lckv_path is None:
            raise ValueError("the LCKV attention backend serves LCKVLlamaForCausalLM only (no attention path given)")
        self.path = lckv_path
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.strict = lckv_strict
        # the reader's window: vLLM's `sliding_window` is the window of the layer's own pages (a producer's page
        # window), which is not always the window its queries read with
        self.window = lckv_window
        self.read_name = lckv_read_name  # the attention layer whose pages this one reads
        self.computes_kv = lckv_computes_kv
        self.streaming = lckv_streaming  # StreamingLLM mode: the engine's `StreamingRead`, else None
        # while a dict (`segments.SegmentUnits.capture`, during a prefill pass): record the K/V this producer writes
        self.capture: dict | None = None
        # (k_scale, v_scale) of this producer's fp8 pages (weights.py sets them from the checkpoint; vLLM's default
        # 1.0 otherwise).  Kept here, not in vLLM's `Attention._k_scale`, which vLLM resets to 1.0 after loading
        # weights of a model without a quantization config.
        self.kv_scales: tuple[float, float] = (1.0, 1.0)

    # ---- the LCKV op ------------------------------------------------------------------------------------------------
    def run(self, layer, layers: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            output: torch.Tensor) -> None:
        """One layer's attention step (`layers`: the forward context's attention layers by name)."""
        step = step_metadata(self.read_name)
        if step is None:  # profiling / dummy run: no pages bound yet
            output.zero_()
            return
        t = step.num_actual_tokens
        if self.computes_kv:
            self.write_own_kv(layer, step, k, v, t)
        qv, ov = q[:t].view(t, self.num_heads, self.head_size), output[:t].view(t, self.num_heads, self.head_size)
        producer = layers[self.read_name]
        pages, scales = producer.kv_cache, producer.impl.kv_scales  # a consumer reads with its producer's scales
        if self.streaming is not None:  # sinks + window, keys rotated at their cache positions
            self.path.attend_streaming(qv, pages, step, scale=self.scale, strict=self.strict, out=ov,
                                       read=self.streaming, scales=scales)
        else:
            self.path.attend(qv, pages, step, scale=self.scale, strict=self.strict, window=self.window, out=ov,
                             scales=scales)
        if t < output.shape[0]:
            output[t:] = 0

    def write_own_kv(self, layer, step: LCKVStep, k: torch.Tensor, v: torch.Tensor, t: int) -> None:
        """This producer's K/V write for the step's first `t` tokens (recorded first while the prefill measures
        how far a pass moved them)."""
        ks, vs = self.kv_scales
        if self.capture is not None:  # as the pages will hold them: convergence is measured on what reads see
            self.capture[layer.layer_name] = torch.cat(
                [self.path.round_trip(k[:t], ks), self.path.round_trip(v[:t], vs)], -1)
        # its own pages may sit in another KV-cache group than the pages it reads (windowed pages): own slots
        own = step if self.read_name == layer.layer_name else step_metadata(layer.layer_name)
        self.path.write_kv(k[:t].view(t, self.num_kv_heads, self.head_size),
                           v[:t].view(t, self.num_kv_heads, self.head_size), layer.kv_cache, own.slot_mapping, own,
                           scales=self.kv_scales)

    # ---- vLLM's generic route ---------------------------------------------------------------------------------------
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        self.path.attend(query[:n].view(n, self.num_heads, self.head_size), kv_cache, attn_metadata,
                         scale=self.scale, strict=self.strict, window=self.window,
                         out=output[:n].view(n, self.num_heads, self.head_size), scales=self.kv_scales)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        n = slot_mapping.shape[0]
        self.path.write_kv(key[:n].view(n, self.num_kv_heads, self.head_size),
                           value[:n].view(n, self.num_kv_heads, self.head_size), kv_cache, slot_mapping,
                           _step_of(layer), scales=self.kv_scales)


class LCKVCpuAttentionImpl(LCKVAttentionImpl):
    pass


# The backend class that declares each page format (`AttentionPath.page_format`).
BACKENDS: dict[str, type[LCKVAttentionBackend]] = {"plain": LCKVAttentionBackend, "cpu": LCKVCpuAttentionBackend}


def _step_of(layer) -> LCKVStep | None:
    """The step a generic-route write belongs to, so paths that cache reads see the write."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, dict):
        md = md.get(getattr(layer, "layer_name", None))
    return md if isinstance(md, LCKVStep) else None
