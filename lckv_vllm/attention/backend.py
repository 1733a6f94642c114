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

The model does not go through `Attention.forward` (which reads and writes one layer's cache): a layer writes its
own pages when it computes KV and reads the pages of the layer it attends to, which may be a different producer.
`write_kv`, `attend` and `zero_slots` below are those entry points.  Which implementation does the math is one
switch (`impl.py`), so the Triton kernels plug in behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

from .. import BACKEND_NAME, CPU_BACKEND_NAME


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


def backend_class(impl: str) -> type[LCKVAttentionBackend]:
    """The backend (hence the page format) an implementation needs."""
    return LCKVCpuAttentionBackend if impl == "cpu" else LCKVAttentionBackend


@dataclass
class LCKVMetadata:
    """One step's batch description, shared by every layer of the step.

    Index tensors that every layer needs (padded query/key gathers, masks) are built on first use and cached here,
    so their cost is paid once per step, not once per layer.
    """

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32, context + this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)


class LCKVMetadataBuilder(AttentionMetadataBuilder[LCKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> LCKVMetadata:
        m = common_attn_metadata
        n = m.num_actual_tokens
        return LCKVMetadata(
            num_actual_tokens=n,
            num_reqs=m.num_reqs,
            max_query_len=int(m.max_query_len),
            max_seq_len=int(m.max_seq_len),
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping[:n],
            query_start_loc_cpu=m.query_start_loc_cpu,
            seq_lens_cpu=getattr(m, "seq_lens_cpu", None),
        )


class LCKVAttentionImpl(AttentionImpl[LCKVMetadata]):
    """The per-layer object vLLM constructs.  It carries the layer's flags; the math lives in `impl.py`.

    `forward` serves a caller that goes through vLLM's `Attention.forward` (own pages, no strictness unless the layer
    was built with `lckv_strict=True`).  The LCKV model calls `write_kv` / `attend` directly instead.
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
        lckv_strict: bool = False,
        lckv_window: int | None = None,
    ) -> None:
        if alibi_slopes is not None or (logits_soft_cap or 0) != 0:
            raise NotImplementedError("the LCKV attention backend supports neither ALiBi nor logit soft-capping")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.strict = lckv_strict
        self.window = lckv_window if lckv_window is not None else sliding_window

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # profiling / warm-up run
            return output
        from .impl import attend

        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        attend(q, kv_cache, attn_metadata, scale=self.scale, strict=self.strict, window=self.window,
               impl=self._impl(q.device), out=output[:n].view(n, self.num_heads, self.head_size))
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        from .impl import write_kv

        n = slot_mapping.shape[0]
        write_kv(key[:n].view(n, self.num_kv_heads, self.head_size), value[:n].view(n, self.num_kv_heads,
                 self.head_size), kv_cache, slot_mapping, impl=self._impl(key.device))

    def _impl(self, device) -> str:
        from .impl import plain_pages_impl

        return plain_pages_impl(device)  # this class's pages are plain slots: torch or Triton


class LCKVCpuAttentionImpl(LCKVAttentionImpl):
    def _impl(self, device) -> str:
        return "cpu"
