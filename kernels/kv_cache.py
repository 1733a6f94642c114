"""Triton kernels that write into the LCKV page layout: store a step's K/V, and zero a step's slots.

The page layout (owned by `lckv_vllm/attention`): a producer's cache viewed as slots `[num_slots, num_kv_heads,
2 * head_size]`, K in the first half of the last axis and V in the second, slot = block_id * block_size + offset.
Slot -1 in a slot mapping marks a padding token and is skipped.  References: `reference.write_kv_ref`,
`reference.zero_slots_ref`.

Import this module only after `TRITON_INTERPRET` has its final value (on CPU it must be "1"): Triton decides at
decoration time whether a `@triton.jit` function is compiled or interpreted.  Triton itself may have been imported
earlier (vLLM does so before plugins run): the kernels use builtins only (`tl.full`, not `tl.zeros`, which is a
@triton.jit function of Triton's standard library and would have been prepared for compilation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= num_kv_heads
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_SIZE
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


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_slots: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store `key`/`value` `[num_tokens, num_kv_heads, head_size]` at `slot_mapping` (-1 skipped) in `kv_slots`."""
    _check_slots(kv_slots)
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
        HEAD_SIZE=head_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_size),
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
