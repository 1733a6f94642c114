"""Paged attention for the LCKV backend: KV writes, zero-fill of producer slots, and attention reads.

One switch picks who does the math: `LCKV_ATTENTION_IMPL` =
* `auto` (default): Triton on CUDA; on CPU vLLM's own C++ kernels (`cpu.py`), or torch for shapes they lack;
* `cpu`: vLLM's CPU kernels, made strict (`cpu.py`); their pages are in the kernels' private format;
* `triton`: the kernels in `lckv_vllm.kernels` (the repository's `kernels/`), on CUDA or under the interpreter;
* `torch`: the portable path below (gather + SDPA), the one every device runs.
The model resolves it when it builds its layers (`resolve_impl`; every layer of a model gets the same answer, since
the page format follows it) and passes the answer to every call (`impl=`): an engine keeps the implementation it was
built with, whatever the environment says later (two engines in one process may differ), and no attention call reads
the environment.

The torch path is not the naive "gather each sequence's pages per layer" loop: everything that depends only on the
batch (padded query/key index tensors, masks) is built once per step and cached on the step's metadata, so each layer
costs one gather, one SDPA call and one scatter.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.nn.functional as F

IMPL_ENV = "LCKV_ATTENTION_IMPL"
logger = logging.getLogger("lckv_vllm")


IMPLS = ("auto", "cpu", "torch", "triton")


def selected_impl(device: torch.device | None = None, choice: str | None = None) -> str:
    """"cpu", "torch" or "triton": `choice` (default: the environment's `LCKV_ATTENTION_IMPL`), auto resolved by
    device alone (no shape checks: see `resolve_impl`)."""
    if choice is None:
        choice = os.environ.get(IMPL_ENV, "auto")
    choice = choice.strip().lower() or "auto"
    if choice not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={choice!r}: expected one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "triton" if (device is not None and torch.device(device).type == "cuda") else "cpu"
    return choice


def plain_pages_impl(device: torch.device | None = None) -> str:
    """The environment's choice for plain slot pages (LBNHC): `cpu` pages are in another format, so it maps to torch.
    What a caller gets that passes no `impl` and so cannot say which format its pages have."""
    impl = selected_impl(device)
    return "torch" if impl == "cpu" else impl


def resolve_impl(device: torch.device | str | None, head_size: int, num_queries_per_kv: int,
                 dtype: torch.dtype | None = None, block_size: int | None = None) -> str:
    """The implementation a model's layers use for their whole life, decided at construction.

    `auto` falls back to torch for shapes the chosen kernels do not cover (with a log line); an explicit `triton` or
    `cpu` for such a shape is an error, raised here rather than at the first request.  Choosing Triton imports the
    kernels now, so a broken Triton install also fails at start-up.
    """
    choice = os.environ.get(IMPL_ENV, "auto")
    explicit = choice.strip().lower()
    impl = selected_impl(device, choice)
    if impl == "torch":
        return "torch"
    problem = None
    if impl == "cpu":
        from . import cpu

        if device is not None and torch.device(device).type != "cpu":
            problem = f"device {device} (vLLM's CPU kernels run on CPU only)"
        else:
            problem = cpu.unsupported_reason(head_size, dtype, block_size)
    else:
        kernels = _kernels()[1]
        if head_size not in kernels.SUPPORTED_HEAD_SIZES:
            problem = f"head size {head_size} (supported: {kernels.SUPPORTED_HEAD_SIZES})"
        elif num_queries_per_kv > kernels.MAX_QUERIES_PER_KV:
            problem = (f"{num_queries_per_kv} query heads per KV head (supported: up to "
                       f"{kernels.MAX_QUERIES_PER_KV})")
    if problem is None:
        return impl
    if explicit == impl:
        raise ValueError(f"{IMPL_ENV}={impl}: the {impl} attention kernels do not support {problem}")
    logger.info("LCKV attention: the %s kernels do not support %s; using the torch path", impl, problem)
    return "torch"


def use_triton_interpreter_if_needed() -> None:
    """Set `TRITON_INTERPRET=1` when the Triton path is asked for and there is no GPU to compile for.

    Triton decides at decoration time, i.e. when a kernel module is imported, whether a `@triton.jit` function is
    compiled or interpreted, so this must run before that import, in every process that may import it:
    `lckv_vllm.register()` calls it (vLLM runs that in each process it starts), and `_kernels()` again before the
    lazy import.  Only an explicit `triton` triggers it: `auto` means torch on a machine without CUDA.
    """
    if os.environ.get(IMPL_ENV, "").strip().lower() != "triton":
        return
    if _kernels_imported():
        return  # too late to matter, and changing it now would only mislead other Triton users of the process
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_KERNELS = None
_KERNEL_MODULES = ("lckv_vllm.kernels.kv_cache", "lckv_vllm.kernels.paged_attention")


def _kernels_imported() -> bool:
    return any(m in sys.modules for m in _KERNEL_MODULES)


def _kernels():
    """The Triton kernel entry points, imported on first use (importing Triton is slow and GPU-only in practice)."""
    global _KERNELS
    if _KERNELS is None:
        if not _kernels_imported() and not torch.cuda.is_available():
            # Defensive twin of use_triton_interpreter_if_needed(): here the caller has already chosen Triton (for
            # instance with impl="triton"), whatever the environment says, and without CUDA only the interpreter runs.
            os.environ["TRITON_INTERPRET"] = "1"
        from ..kernels import kv_cache, paged_attention

        _KERNELS = (kv_cache, paged_attention)
    return _KERNELS


def slot_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """A producer's cache as `[num_slots, num_kv_heads, 2 * head_size]` (K first half, V second half).

    vLLM hands each layer a logical `[num_blocks, num_kv_heads, block_size, 2 * head_size]` view whose physical order
    is LBNHC (the layout our backend asks for), i.e. token-major; transposing back gives a contiguous tensor.
    """
    if kv_cache.dim() == 3:
        return kv_cache
    nb, h, bs, c = kv_cache.shape
    phys = kv_cache.transpose(1, 2)
    assert phys.is_contiguous(), "LCKV KV pages must be token-major (LBNHC layout)"
    return phys.reshape(nb * bs, h, c)


# Writes per page tensor (keyed by data pointer).  The torch path reuses a gathered copy of a producer's pages for
# consecutive layers that read the same producer (LCKV's consumers all read one layer) as long as nothing was
# written to those pages in between; every write or zero-fill bumps this counter and so invalidates the copy.
_WRITES: dict[int, int] = {}


def _bump(slots: torch.Tensor) -> None:
    ptr = slots.data_ptr()
    _WRITES[ptr] = _WRITES.get(ptr, 0) + 1


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
             impl: str | None = None) -> None:
    """Store `key`/`value` `[num_tokens, num_kv_heads, head_size]` at `slot_mapping` (−1 = padding, skipped)."""
    impl = impl or plain_pages_impl(key.device)
    if impl == "cpu":
        from . import cpu

        cpu.write_kv(key, value, kv_cache, slot_mapping)
        return
    slots = slot_view(kv_cache)
    _bump(slots)
    if impl == "triton":
        _kernels()[0].write_kv(key, value, slots, slot_mapping)
        return
    sm = slot_mapping.long()
    valid = sm >= 0
    if not bool(valid.all()):
        sm, key, value = sm[valid], key[valid], value[valid]
    # one copy of whole slots (K and V side by side), not two strided scatters into halves of the last axis
    slots.index_copy_(0, sm, torch.cat([key, value], -1).to(slots.dtype))


def zero_slots(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, *, impl: str | None = None) -> None:
    """Zero the K/V of this step's tokens: the starting point of an iterative prefill (DESIGN.md §1)."""
    impl = impl or plain_pages_impl(kv_cache.device)
    if impl == "cpu":
        from . import cpu

        cpu.zero_slots(kv_cache, slot_mapping)
        return
    slots = slot_view(kv_cache)
    _bump(slots)
    if impl == "triton":
        _kernels()[0].zero_slots(slots, slot_mapping)
        return
    sm = slot_mapping.long()
    sm = sm[sm >= 0]
    slots[sm] = 0


def attend(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md,
    *,
    scale: float,
    strict: bool,
    window: int | None,
    impl: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of this step's queries `[num_tokens, num_heads, head_size]` over the pages in `kv_cache`.

    `strict`: the query at position t sees keys < t (a query with no visible key outputs exactly 0); otherwise ≤ t.
    `window`: only the `window` most recent positions t-window+1 … t are visible (minus t itself when strict).
    `impl`: "cpu" | "torch" | "triton" as resolved by `resolve_impl`; None: `plain_pages_impl` (environment, now).
    `out`: where to write the result (same shape as `q`); the returned tensor is `out` then.
    """
    impl = impl or plain_pages_impl(q.device)
    if impl == "cpu":
        from . import cpu

        return cpu.attend(q, kv_cache, md, scale=scale, strict=strict, window=window, out=out)
    if impl == "triton":
        o = triton_attend(q, kv_cache, md, scale=scale, strict=strict, window=window)
    else:
        o = torch_attend(q, kv_cache, md, scale=scale, strict=strict, window=window)
    if out is None:
        return o
    out.copy_(o)
    return out


def triton_attend(q, kv_cache, md, *, scale, strict, window):
    if kv_cache.dim() != 4:
        raise ValueError("the Triton path needs vLLM's 4-D page tensor (it reads the block size from it)")
    B = md.num_reqs
    return _kernels()[1].paged_attention(
        q,
        slot_view(kv_cache),
        query_start_loc=md.query_start_loc[: B + 1],
        seq_lens=md.seq_lens[:B],
        block_table=md.block_table[:B],
        block_size=kv_cache.shape[2],
        scale=scale,
        strict=strict,
        window=window,
        max_query_len=md.max_query_len,
        max_seq_len=md.max_seq_len,
    )


# --------------------------------------------------------------------------------------------------------------------
# torch path


class _StepIndex:
    """Per-step gather/scatter indices, shared by all layers (cached on the metadata)."""

    def __init__(self, md, block_size: int, device: torch.device):
        qsl = (md.query_start_loc_cpu if md.query_start_loc_cpu is not None else md.query_start_loc).cpu().long()
        B = md.num_reqs
        qsl = qsl[: B + 1]
        seq_lens = (md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens).cpu().long()[:B]
        q_lens = qsl[1:] - qsl[:-1]
        Q = int(q_lens.max()) if B else 0
        K = int(seq_lens.max()) if B else 0
        self.B, self.Q, self.K = B, Q, K
        j = torch.arange(Q)
        q_valid = j[None, :] < q_lens[:, None]  # [B, Q]
        ctx = seq_lens - q_lens
        self.q_pos = (ctx[:, None] + j[None, :]).to(device)  # [B, Q] absolute position of each padded query
        self.q_valid = q_valid.to(device)
        kp = torch.arange(K)
        self.k_valid = (kp[None, :] < seq_lens[:, None]).to(device)  # [B, K]
        bt = md.block_table[:B].long()
        nblk = (K + block_size - 1) // block_size
        if nblk > bt.shape[1]:
            raise RuntimeError(f"block table has {bt.shape[1]} blocks per sequence, need {nblk}")
        kpd = kp.to(bt.device)
        slot = bt[:, kpd // block_size] * block_size + (kpd % block_size)[None, :]  # [B, K]
        self.k_slot = torch.where(self.k_valid, slot.to(device), 0)
        self.k_slot_flat = self.k_slot.reshape(-1)
        self.k_pos = kp.to(device)
        self.num_tokens = int(qsl[-1])
        self.masks: dict = {}
        self.single_query = Q == 1

    def mask(self, strict: bool, window: int | None):
        key = (strict, window)
        m = self.masks.get(key)
        if m is None:
            qp = self.q_pos[:, :, None]
            kp = self.k_pos[None, None, :]
            vis = (kp < qp) if strict else (kp <= qp)
            if window is not None:
                vis = vis & (kp > qp - window)
            vis = vis & self.k_valid[:, None, :]
            has_key = vis.any(-1)  # [B, Q]
            if bool((has_key | ~self.q_valid).all()):
                has_key = None  # every real query sees a key (always so unless a strict row sits at position 0)
            m = (vis[:, None, :, :], has_key)
            self.masks[key] = m
        return m


def _step_index(md, block_size: int, device: torch.device) -> _StepIndex:
    idx = md.cache.get(("torch_index", block_size))
    if idx is None:
        idx = _StepIndex(md, block_size, device)
        md.cache[("torch_index", block_size)] = idx
    return idx


def torch_attend(q, kv_cache, md, *, scale, strict, window):
    T, Hq, D = q.shape
    block_size = kv_cache.shape[2] if kv_cache.dim() == 4 else None
    slots = slot_view(kv_cache)
    idx = _step_index(md, block_size, q.device)
    assert idx.num_tokens == T, (idx.num_tokens, T)
    Hk = slots.shape[1]
    key = (slots.data_ptr(), _WRITES.get(slots.data_ptr(), 0))
    last = md.cache.get("gathered")
    if last is not None and last[0] == key:
        kv = last[1]  # same producer, unchanged since the previous layer gathered it
    else:
        # index_select on the 2-D [slots, Hk*2D] view copies whole rows: ~6x faster on CPU than advanced indexing
        kv = slots.view(slots.shape[0], -1).index_select(0, idx.k_slot_flat).view(idx.B, idx.K, Hk, 2 * D)
        md.cache["gathered"] = (key, kv)  # one entry: the copy lives only while consecutive layers share it
    k = kv[..., :D].transpose(1, 2)  # [B, Hk, K, D]
    v = kv[..., D:].transpose(1, 2)
    vis, has_key = idx.mask(strict, window)
    if idx.single_query:
        qp = q[:, None]  # [B, 1, Hq, D], one query per sequence: no padding
    else:
        qp = q.new_zeros(idx.B, idx.Q, Hq, D)
        qp[idx.q_valid] = q
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=vis, scale=scale, enable_gqa=Hq != Hk
    )  # [B, Hq, Q, D]
    out = out.transpose(1, 2)  # [B, Q, Hq, D]
    # A row that sees no key (position 0 under the strict mask) is defined as 0, not NaN and not a uniform average.
    if has_key is not None:
        out = torch.where(has_key[:, :, None, None], out, 0.0)
    if idx.single_query:
        return out[:, 0]
    return out[idx.q_valid]
