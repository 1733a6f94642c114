"""Sink + window pages for StreamingLLM mode (`lckv_streaming`): a KV spec that keeps a sequence's first tokens and
its last ones, and the manager that frees the blocks in between.

Why: vLLM has no KV spec that keeps a sequence's first tokens *and* its last ones (its attention-sink work was never
merged).  `SinkWindowSpec` is a `SlidingWindowSpec` that also keeps `sink_tokens`; `SinkWindowManager` is vLLM's
`SlidingWindowManager`, freeing only the blocks between the sink blocks and the window, and never reporting a
prefix-cache hit (a hit would need the sink blocks too, so the config hook turns prefix caching off in this mode).
`register_sink_window_pages()` puts both into vLLM's `KVCacheSpecRegistry` in every process (`register()`: the
scheduler that runs the manager may live in another process than the model); `vllm_patches.use_sink_window_pages`
makes a producer's `Attention` ask for the spec (vllm_patches item 8).
"""

from __future__ import annotations

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
    """Register the spec and its manager (idempotent; vLLM's own specs first, or its lazy registration
    would see a non-empty registry and skip them)."""
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    spec, manager = sink_window_classes()
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(spec, manager, uniform_type_base_spec=spec)


def __getattr__(name: str):
    # `sink_window_pages.SinkWindowSpec` resolves (and defines) the class: a spec pickled in a worker process unpickles
    # in the scheduler's by this name
    if name in ("SinkWindowSpec", "SinkWindowManager"):
        spec, manager = sink_window_classes()
        return spec if name == "SinkWindowSpec" else manager
    raise AttributeError(name)
