"""`LCKVStep`: one engine step's batch, described once and read by every layer and every attention path.

vLLM's metadata builder (`backend.LCKVMetadataBuilder`) makes one per step from vLLM's common metadata; the exact
re-encoding after preemption (`resume.py`) makes sub-steps from it with `substep`.  Everything a path or the pass loop
derives from the batch is derived here, once: host-side query/context lengths, which sequences start at position 0
(their first row sees no key under the strict mask), the strict sequence lengths.  The per-step caches of the paths
live here too, as typed fields, so nothing outlives the step.

A model whose producers sit in several KV-cache groups (windowed pages: full-attention and sliding-window producers,
`LayerPlan.page_window`) gets one step object per group from vLLM: same requests, lengths and positions, each with
its group's block table and slot mapping.  The model links them (`family`, every member listing all) so that a
sub-step is cut from every group at once and swapped in for each layer's own group (`vllm_patches.metadata_swapped`).

Device tensors that are derived per step (`strict_seq_lens`) are written into buffers the builder allocates once
(`StepBuffers`), so their addresses do not change from step to step, as CUDA-graph capture will require.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class StepBuffers:
    """Persistent device buffers for per-step derived tensors, sized for the engine's largest batch."""

    def __init__(self, max_num_reqs: int, device: torch.device):
        self.strict_seq_lens = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)


@dataclass(eq=False)
class LCKVStep:
    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    # device side, as vLLM hands them over (views; rows past num_reqs / num_actual_tokens are padding)
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32: context + this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, -1 = padding
    strict_seq_lens: torch.Tensor  # [num_reqs] int32: seq_lens - 1 (what a query sees under the strict mask)
    # host side (CPU tensors), derived once
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1] int64
    query_lens_cpu: torch.Tensor  # [num_reqs] int64
    seq_lens_cpu: torch.Tensor  # [num_reqs] int64
    context_lens_cpu: torch.Tensor  # [num_reqs] int64: tokens already in the cache before this step
    starts_at_zero: torch.Tensor  # [num_reqs] bool: the step's first token of that sequence is position 0
    any_starts_at_zero: bool
    # prompt length of each request (numpy, batch order); set by the model runner hook (vllm_patches.py, item 4)
    # only while the model asks for it (exact re-encoding after preemption)
    prompt_lens: object = None
    # per-step caches of the attention paths (see each path for its content)
    torch_index: object = None
    stream_index: object = None  # StreamingLLM reads (streaming_read.py)
    cpu_state: object = None
    gathered: object = None  # torch path: (pages data_ptr, kv_version, gathered copy)
    later_passes: dict | None = None  # pass k -> (rows, sub-step) of the rows that pass k must recompute
    prefill_blocks: tuple | None = None  # prefill blocks as rounds (rows, sub-step, requests); () = none (prefill.py)
    kv_version: int = 0  # bumped by every write to any pages during the step: invalidates `gathered`
    # several KV-cache groups: every group's step of this batch, this one included, in one shared order (None: one
    # group); for a sub-step, `origin` is the step it was cut from and `rows` its tokens' indices among the origin's
    family: list | None = None
    origin: object = None
    rows: torch.Tensor | None = None

    @property
    def members(self) -> list:
        return self.family if self.family is not None else [self]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len <= 1


def make_step(*, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
              slot_mapping: torch.Tensor, num_reqs: int, num_actual_tokens: int,
              query_start_loc_cpu: torch.Tensor | None, seq_lens_cpu: torch.Tensor | None,
              buffers: StepBuffers | None = None) -> LCKVStep:
    """Describe a step.  The `*_cpu` copies are used when given (vLLM has them), else read back from the device."""
    B = num_reqs
    qsl = (query_start_loc_cpu if query_start_loc_cpu is not None else query_start_loc)[: B + 1].cpu().long()
    sl = (seq_lens_cpu if seq_lens_cpu is not None else seq_lens)[:B].cpu().long()
    q_lens = qsl[1:] - qsl[:-1]
    at_zero = sl == q_lens
    seq_lens = seq_lens[:B]
    if buffers is not None and B <= buffers.strict_seq_lens.shape[0]:
        strict = buffers.strict_seq_lens[:B]
        torch.sub(seq_lens, 1, out=strict)
    else:
        strict = seq_lens - 1
    return LCKVStep(
        num_actual_tokens=num_actual_tokens,
        num_reqs=B,
        max_query_len=int(q_lens.max()) if B else 0,
        max_seq_len=int(sl.max()) if B else 0,
        query_start_loc=query_start_loc[: B + 1],
        seq_lens=seq_lens,
        block_table=block_table[:B],
        slot_mapping=slot_mapping[:num_actual_tokens],
        strict_seq_lens=strict,
        query_start_loc_cpu=qsl,
        query_lens_cpu=q_lens,
        seq_lens_cpu=sl,
        context_lens_cpu=sl - q_lens,
        starts_at_zero=at_zero,
        any_starts_at_zero=bool(at_zero.any()),
    )


def pass_substep(step: LCKVStep, k: int) -> tuple[torch.Tensor, LCKVStep] | None:
    """The rows pass `k` (2, 3, ...) of an iterative prefill must recompute, as a sub-step, or None if no row needs it.

    After pass k-1 the first k-1 tokens of every query of the step are exact (a decode row after pass 1), so pass k
    recomputes only each query's tokens from index k-1 on; the exact ones are context, already final in the pages.
    Cached on the step: every cyclic segment of the step uses the same sub-steps.
    """
    if step.later_passes is None:
        step.later_passes = {}
    if k not in step.later_passes:
        q_lens = step.query_lens_cpu
        reqs = (q_lens >= k).nonzero().flatten()
        if reqs.numel() == 0:
            step.later_passes[k] = None
        else:
            step.later_passes[k] = substep(step, reqs, torch.full_like(reqs, k - 1), q_lens[reqs] - (k - 1))
    return step.later_passes[k]


def substep(step: LCKVStep, reqs: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, LCKVStep]:
    """Part of a step: request `reqs[i]` contributes its step tokens [starts[i], starts[i] + lens[i]) (host tensors).

    Returns the rows (indices into the step's tokens, on the step's device) and the sub-step describing just them,
    with the context each request had at that point; cut from every KV-cache group's step of the batch (`family`).
    """
    qsl = step.query_start_loc_cpu
    rows = torch.cat([torch.arange(int(qsl[r] + s), int(qsl[r] + s + n)) for r, s, n in
                      zip(reqs.tolist(), starts.tolist(), lens.tolist())])
    new_qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    new_qsl[1:] = lens.cumsum(0)
    seq_lens = (step.context_lens_cpu[reqs] + starts + lens).to(torch.int32)
    device = step.query_start_loc.device
    rows_dev = rows.to(device)
    qsl_dev, seq_lens_dev = new_qsl.to(device), seq_lens.to(device)
    subs = []
    for m in step.members:
        sub = make_step(
            query_start_loc=qsl_dev,
            seq_lens=seq_lens_dev,
            block_table=m.block_table.index_select(0, reqs.to(m.block_table.device)),
            slot_mapping=m.slot_mapping.index_select(0, rows_dev),
            num_reqs=int(reqs.numel()),
            num_actual_tokens=int(rows.numel()),
            query_start_loc_cpu=new_qsl,
            seq_lens_cpu=seq_lens,
        )
        sub.origin, sub.rows = m, rows_dev
        subs.append(sub)
    if len(subs) > 1:
        for sub in subs:
            sub.family = subs
    return rows_dev, subs[step.members.index(step)]
