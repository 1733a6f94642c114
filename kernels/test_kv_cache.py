"""KV write and zero-fill kernels against their references (`torch_reference.py`): exact equality, since both copy."""

import pytest
import torch

from lckv_vllm.kernels.kv_cache import write_kv, zero_slots
from lckv_vllm.kernels.torch_reference import fp8_bits_ref, write_kv_ref, zero_slots_ref

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


@pytest.mark.parametrize("fp8", ["fp8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_write_kv_fp8_matches_reference(fp8, dtype):
    """uint8 pages: fp8(x / scale), saturated, to nearest even; bit-identical to the reference."""
    k, v, slots, _ = _case(2, 64, dtype, num_tokens=11, num_slots=40, seed=3)
    k = k * 40  # some elements past the formats' range after the division: saturation
    v = v.clone()
    v[0, 0, :3] = torch.tensor([1e9, -1e9, 1e-9])
    cache = torch.zeros(40, 2, 128, dtype=torch.uint8)
    expect = cache.clone()
    write_kv_ref(k, v, expect, slots, fp8=fp8, scales=(0.3, 1.7))
    got = cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), got, slots.to(DEVICE), fp8=fp8, scales=(0.3, 1.7))
    assert torch.equal(got.cpu(), expect)
    written = expect[slots[slots >= 0]]
    from lckv_vllm.kernels.torch_reference import FP8_TORCH

    assert (written != 0).any() and bool(written.view(FP8_TORCH[fp8]).float().isfinite().all())  # saturated, no NaN
    # the scales matter: with others the bytes differ
    assert not torch.equal(expect[slots[slots >= 0]][..., :64], fp8_bits_ref(k[slots >= 0], fp8, 1.0))


def test_write_kv_fp8_needs_uint8_pages():
    k, v, slots, cache = _case(1, 32, torch.float32, num_tokens=3, num_slots=8, seed=2)
    with pytest.raises(ValueError, match="uint8"):
        write_kv(k.to(DEVICE), v.to(DEVICE), cache.to(DEVICE), slots.to(DEVICE), fp8="fp8")


@pytest.mark.parametrize("fp8", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_encoding_at_every_rounding_boundary(fp8):
    """Every fp8 value, every midpoint between neighbours (ties to even), one float32 step either side of each
    midpoint, both signs, beyond the largest value and in the subnormal range: the kernel's bytes equal torch's
    cast after saturation.  (Triton's own fp8 cast, under its interpreter, got the carries at powers of two wrong.)"""
    from lckv_vllm.kernels.torch_reference import FP8_TORCH

    dt = FP8_TORCH[fp8]
    values = torch.arange(128, dtype=torch.uint8).view(dt).float()
    values = values[values.isfinite()].sort().values
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, torch.nextafter(mids, torch.tensor(-1.0)), torch.nextafter(mids, torch.tensor(1e9)),
                   values[-1:] * 1.5, torch.tensor([1e30, 0.0])])
    x = torch.cat([x, -x])
    d = 32
    n = (x.numel() + d - 1) // d
    k = torch.zeros(n * d)
    k[:x.numel()] = x
    k = k.view(n, 1, d)
    slots = torch.arange(n)
    got = torch.zeros(n, 1, 2 * d, dtype=torch.uint8, device=DEVICE)
    write_kv(k.to(DEVICE), k.to(DEVICE), got, slots.to(DEVICE), fp8=fp8)
    expect = torch.zeros_like(got.cpu())
    write_kv_ref(k, k, expect, slots, fp8=fp8)
    assert torch.equal(got.cpu(), expect)
