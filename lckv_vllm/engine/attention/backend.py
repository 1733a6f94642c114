"""The plugin's vLLM attention backend: metadata builder, page layout and the per-layer entry points.

Why a backend of our own: vLLM's backends cannot express "a query must not see its own, not-yet-computed KV"
(strict causal attention into another layer's pages).  Two page formats, one backend class each, chosen by the
model from the resolved implementation (`backend_class`):
* `LCKVAttentionBackend` (torch and Triton paths): plain slots `[num_blocks * block_size, num_kv_heads,
  2 * head_size]`, K in the first half of the last axis and V in the second (vLLM's LBNHC physical layout:
  token-major pages);
* `LCKVCpuAttentionBackend` (the `cpu` path, vLLM's own C++ kernels made strict, see `cpu.py`): the format those
  kernels own (head-major blocks, LBHNC, K transposed inside a block).  vLLM resolves one layout per engine from the
  backends' declarations, which is why the format is a property of the class, not of a call.

The metadata builder makes the step object (`step.LCKVStep`) every layer reads.  The model does not go through
`Attention.forward` (which reads and writes one layer's cache): a layer writes its own pages when it computes KV and
reads the pages of the layer it attends to, which may be a different producer, through the engine's attention path
(`base.AttentionPath`).  `LCKVAttentionImpl` below serves callers that do use `Attention.forward`.
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

from lckv_vllm import BACKEND_NAME, CPU_BACKEND_NAME
from .step import LCKVStep, StepBuffers, make_step


class LCKVAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    accept_output_buffer: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

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
        from .cpu import BLOCK_SIZE_MULTIPLE

        return [MultipleOf(BLOCK_SIZE_MULTIPLE)]

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
    """The per-layer object vLLM constructs: the layer's flags and the engine's attention path (`lckv_path`).

    `forward` / `do_kv_cache_update` serve a caller that goes through vLLM's `Attention.forward` (own pages, strict
    only if the layer was built with `lckv_strict=True`).  The LCKV model calls its path directly instead.
    """

    default_path = "torch"  # for a layer built without `lckv_path`: a path that reads this class's page format

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
        lckv_strict: bool = False,
        lckv_window: int | None = None,
        lckv_path=None,
    ) -> None:
        if alibi_slopes is not None or (logits_soft_cap or 0) != 0:
            raise NotImplementedError("the LCKV attention backend supports neither ALiBi nor logit soft-capping")
        if lckv_path is None:
            # No path handed over (a model other than ours picked this backend by name): the plain page format of
            # this class serves the torch path on any device.
            from .select import make_path

            lckv_path = make_path(self.default_path)
        self.path = lckv_path
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.strict = lckv_strict
        # the LCKV model hands its reader's window over; vLLM's `sliding_window` is the window of the layer's own
        # pages (a producer's page window), which is not always the window its queries read with
        self.window = lckv_window if lckv_path is not None or lckv_window is not None else sliding_window

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        self.path.attend(query[:n].view(n, self.num_heads, self.head_size), kv_cache, attn_metadata,
                         scale=self.scale, strict=self.strict, window=self.window,
                         out=output[:n].view(n, self.num_heads, self.head_size))
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        n = slot_mapping.shape[0]
        self.path.write_kv(key[:n].view(n, self.num_kv_heads, self.head_size),
                           value[:n].view(n, self.num_kv_heads, self.head_size), kv_cache, slot_mapping,
                           _step_of(layer))


class LCKVCpuAttentionImpl(LCKVAttentionImpl):
    default_path = "cpu"


def _step_of(layer) -> LCKVStep | None:
    """The step a generic-route write belongs to, so paths that cache reads see the write."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, dict):
        md = md.get(getattr(layer, "layer_name", None))
    return md if isinstance(md, LCKVStep) else None
