"""Triton paged-attention kernels for cross-layer KV sharing, each beside its torch reference.

Installed as `lckv_vllm.kernels`.  Modules: `kv_cache` (KV write and zero-fill of slots), `paged_attention` (the
unified prefill/decode kernel with its split-KV path), `reference` (float64 torch references), `bench` (CUDA
benchmark against vLLM's own attention).  Nothing here imports vLLM or the model (the benchmark's vLLM baseline is an
optional import).  This package imports nothing itself: Triton must see `TRITON_INTERPRET` (CPU) before a kernel
module is imported, so the caller decides when that happens (`lckv_vllm/engine/attention/triton_path.py`).
"""
