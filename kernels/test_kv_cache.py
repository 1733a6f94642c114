"""KV write and zero-fill kernels against their references (`reference.py`): exact equality, since both copy."""

import pytest
import torch

from lckv_vllm.kernels.kv_cache import write_kv, zero_slots
from lckv_vllm.kernels.reference import write_kv_ref, zero_slots_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(num_kv_heads, head_size, dtype, num_tokens, num_slots, seed):
    g = torch.Generator().manual_seed(seed)
    # Keys/values as the model hands them over: views into a fused qkv projection (non-contiguous rows).
    qkv = torch.randn(num_tokens, (2 + 2 * num_kv_heads) * head_size, generator=g).to(dtype)
    k = qkv[:, 2 * head_size:(2 + num_kv_heads) * head_size].view(num_tokens, num_kv_heads, head_size)
    v = qkv[:, (2 + num_kv_heads) * head_size:].view(num_tokens, num_kv_heads, head_size)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]  # distinct, scattered
    slots[torch.rand(num_tokens, generator=g) < 0.25] = -1  # padding tokens
    cache = torch.randn(num_slots, num_kv_heads, 2 * head_size, generator=g).to(dtype)
    return k, v, slots, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_size", [(1, 32), (3, 80), (2, 128)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_write_kv_matches_reference(dtype, num_kv_heads, head_size, index_dtype):
    k, v, slots, cache = _case(num_kv_heads, head_size, dtype, num_tokens=11, num_slots=40, seed=head_size)
    expect = cache.clone()
    write_kv_ref(k, v, expect, slots)
    got = cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), got, slots.to(index_dtype).to(DEVICE))
    assert torch.equal(got.cpu(), expect)  # NaN-free inputs: equal means bit-identical


def test_write_kv_all_padding_changes_nothing():
    k, v, slots, cache = _case(2, 64, torch.float32, num_tokens=4, num_slots=8, seed=1)
    got = cache.clone().to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), got, torch.full((4,), -1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(got.cpu(), cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_size", [(1, 32), (3, 96)])
def test_zero_slots_matches_reference(dtype, num_kv_heads, head_size):
    _, _, slots, cache = _case(num_kv_heads, head_size, dtype, num_tokens=9, num_slots=30, seed=7)
    expect = cache.clone()
    zero_slots_ref(expect, slots)
    got = cache.to(DEVICE)
    zero_slots(got, slots.to(DEVICE))
    assert torch.equal(got.cpu(), expect)
    assert (expect[slots[slots >= 0]] == 0).all() and (expect != 0).any()  # the case really zeroes some, not all
