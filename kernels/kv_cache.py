"""Triton kernels that write into the LCKV page layout: store a step's K/V, and zero a step's slots.

The page layout (owned by `lckv_vllm/attention`): a producer's cache viewed as slots `[num_slots, num_kv_heads,
2 * head_size]`, K in the first half of the last axis and V in the second, slot = block_id * block_size + offset.
Slot -1 in a slot mapping marks a padding token and is skipped.  References: `reference.write_kv_ref`,
`reference.zero_slots_ref`.

fp8 pages (FP8 = 1: e4m3fn, 2: e5m2; the page tensor is uint8): the kernel stores fp8(x / scale), saturated at the
format's largest finite value and rounded to nearest even, as vLLM's CUDA kernels do (docs/semantics.md, section 6;
reference: `reference.write_kv_ref(..., fp8=, scales=)`).  Zero bytes are +0 in both formats, so zeroing is the same.

Import this module only after `TRITON_INTERPRET` has its final value (on CPU it must be "1"): Triton decides at
decoration time whether a `@triton.jit` function is compiled or interpreted.  Triton itself may have been imported
earlier (vLLM does so before plugins run): the kernels use builtins only (`tl.full`, not `tl.zeros`, which is a
@triton.jit function of Triton's standard library and would have been prepared for compilation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# --kv-cache-dtype names -> the kernels' FP8 constexpr (0: pages in the model's dtype)
FP8_FORMATS = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 2}
FP8_MAX = {1: 448.0, 2: 57344.0}


@triton.jit
def _fp8_encode(x, MAX: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr):
    """fp32 -> an fp8 byte with MAN mantissa bits and exponent bias BIAS: saturated at MAX, rounded to nearest even.

    Integer arithmetic on the float32 bits rather than Triton's fp8 cast: Triton 3.x's interpreter drops the carry
    when rounding crosses a power of two (7.95 -> 6.0 instead of 8.0 in e4m3, measured), and this way the same
    code runs on every GPU generation.  Subnormal range (below 2**(1 - BIAS)): the code is the value in units of
    the smallest subnormal (SUB = its inverse), rounded; codes run on into the normal range without a gap."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.minimum((bits & 0x7FFFFFFF).to(tl.float32, bitcast=True), MAX)
    t = a * SUB  # exact: SUB is a power of two
    ti = t.to(tl.int32)
    frac = t - ti.to(tl.float32)
    sub_code = ti + ((frac > 0.5) | ((frac == 0.5) & ((ti & 1) == 1))).to(tl.int32)
    ab = a.to(tl.int32, bitcast=True)
    SHIFT: tl.constexpr = 23 - MAN
    HALF: tl.constexpr = 1 << (SHIFT - 1)
    keep = (ab & 0x7FFFFF) >> SHIFT
    rest = ab & ((1 << SHIFT) - 1)
    up = ((rest > HALF) | ((rest == HALF) & ((keep & 1) == 1))).to(tl.int32)
    # a carry out of the mantissa runs into the exponent by the addition itself
    norm_code = ((((ab >> 23) & 0xFF) - 127 + BIAS) << MAN) + keep + up
    code = tl.where(t < (1 << MAN), sub_code, norm_code)
    return (code | (sign << 7)).to(tl.uint8)


@triton.jit
def _to_fp8_bits(x, FP8: tl.constexpr):
    """fp32 -> the page byte of format FP8 (1: e4m3fn, 2: e5m2)."""
    if FP8 == 1:
        return _fp8_encode(x, 448.0, 3, 7, 512.0)
    else:
        return _fp8_encode(x, 57344.0, 2, 15, 65536.0)


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, HEAD_SIZE], strides (stride_kt, stride_kh, 1)
    value_ptr,  # [num_tokens, num_kv_heads, HEAD_SIZE], strides (stride_vt, stride_vh, 1)
    kv_ptr,  # [num_slots, num_kv_heads, 2 * HEAD_SIZE], strides (stride_slot, stride_head, 1)
    slot_mapping_ptr,  # [num_tokens] int32/int64, -1 = padding (skipped)
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_slot,
    stride_head,
    k_scale,  # FP8 only: the producer's scales (pages hold fp8(x / scale))
    v_scale,
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= num_kv_heads
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_SIZE
    FP8: tl.constexpr = 0,  # 0: pages in kv_ptr's dtype; 1: fp8 e4m3fn bytes; 2: fp8 e5m2 bytes
):
    # One program per token, all heads at once: a slot's [num_kv_heads, 2 * HEAD_SIZE] is contiguous, so the
    # stores of one program cover one contiguous stretch of the page.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # A masked store rather than an early return: the padding token's pointers are never dereferenced.  (The slot
    # test is broadcast to a tensor before `&`: Triton's interpreter turns scalar-bool & tensor-bool into int64.)
    slot_ok = (slot + tl.full([BLOCK_H, 1], 0, tl.int64)) >= 0
    mask = slot_ok & (h[:, None] < num_kv_heads) & (d[None, :] < HEAD_SIZE)
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = kv_ptr + slot * stride_slot + h[:, None] * stride_head + d[None, :]
    if FP8 != 0:
        tl.store(dst, _to_fp8_bits(k.to(tl.float32) / k_scale, FP8), mask=mask)
        tl.store(dst + HEAD_SIZE, _to_fp8_bits(v.to(tl.float32) / v_scale, FP8), mask=mask)
    else:
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HEAD_SIZE, v.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zero_slots_kernel(
    kv_ptr,  # [num_slots, num_kv_heads, ROW], strides (stride_slot, stride_head, 1)
    slot_mapping_ptr,  # [num_tokens] int32/int64, -1 = padding (skipped)
    num_kv_heads,
    stride_slot,
    stride_head,
    ROW: tl.constexpr,  # 2 * head_size: K and V together
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next power of two >= ROW
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    slot_ok = (slot + tl.full([BLOCK_H, 1], 0, tl.int64)) >= 0  # broadcast first (see _write_kv_kernel)
    mask = slot_ok & (h[:, None] < num_kv_heads) & (c[None, :] < ROW)
    zeros = tl.full([BLOCK_H, BLOCK_C], 0, kv_ptr.dtype.element_ty)
    tl.store(kv_ptr + slot * stride_slot + h[:, None] * stride_head + c[None, :], zeros, mask=mask)


def _check_slots(kv_slots: torch.Tensor) -> None:
    if kv_slots.dim() != 3 or kv_slots.stride(-1) != 1:
        raise ValueError(f"expected a slot view [num_slots, num_kv_heads, 2 * head_size] with a contiguous last "
                         f"axis, got shape {tuple(kv_slots.shape)} strides {kv_slots.stride()}")


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_slots: torch.Tensor, slot_mapping: torch.Tensor,
             fp8: str | None = None, scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """Store `key`/`value` `[num_tokens, num_kv_heads, head_size]` at `slot_mapping` (-1 skipped) in `kv_slots`.
    `fp8` ("fp8", "fp8_e4m3", "fp8_e5m2"; `kv_slots` uint8): store fp8(x / scale) with `scales` = (k, v)."""
    _check_slots(kv_slots)
    fmt = FP8_FORMATS[fp8] if fp8 else 0
    if fmt and kv_slots.dtype != torch.uint8:
        raise ValueError(f"fp8 pages are uint8 tensors, got {kv_slots.dtype}")
    num_tokens, num_kv_heads, head_size = key.shape
    if kv_slots.shape[1:] != (num_kv_heads, 2 * head_size):
        raise ValueError(f"key {tuple(key.shape)} does not fit slots {tuple(kv_slots.shape)}")
    if num_tokens == 0:
        return
    # The kernel addresses the head axis by stride but assumes a unit stride along head_size.
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_slots, slot_mapping[:num_tokens],
        num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_slots.stride(0), kv_slots.stride(1),
        float(scales[0]), float(scales[1]),
        HEAD_SIZE=head_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_size),
        FP8=fmt,
    )


def zero_slots(kv_slots: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Set K and V of every slot in `slot_mapping` (-1 skipped) to zero."""
    _check_slots(kv_slots)
    n = slot_mapping.shape[0]
    if n == 0:
        return
    num_kv_heads, row = kv_slots.shape[1], kv_slots.shape[2]
    _zero_slots_kernel[(n,)](
        kv_slots, slot_mapping,
        num_kv_heads,
        kv_slots.stride(0), kv_slots.stride(1),
        ROW=row,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_C=triton.next_power_of_2(row),
    )
