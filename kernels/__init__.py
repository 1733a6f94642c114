"""Triton paged-attention kernels for cross-layer KV sharing, each beside its torch reference (issue 3)."""
