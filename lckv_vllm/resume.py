"""Exact re-encoding of preempted requests for cyclic plans (DESIGN.md §1, "recompute after preemption").

When the KV cache is full, vLLM preempts a request and later recomputes its KV by prefilling prompt + generated
tokens in one step.  The original run encoded the prompt iteratively (m+b passes) and then each generated token
exactly, one per step; iterating m+b passes over prompt + generated tokens instead gives different KVs beyond m+b
tokens, so a request's output would depend on whether the server happened to be full.

This module redoes the original order inside that one step.  For every cyclic segment:
1. the prompt part of the step's tokens (per request, the tokens before `num_prompt_tokens`) is encoded as a
   prefill of its own: producer slots zeroed, `min(m+b, longest prompt part)` passes — the same computation as the
   request's first prefill (prompt tokens never see later tokens);
2. the generated part is then encoded one token per request at a time, each a one-pass step with the context so
   far, like the decode steps that produced those tokens.
Each part runs with attention metadata of its own (a sub-step: its tokens, context lengths, slots), swapped into
vLLM's forward context for the duration; acyclic segments run once over the whole step, which is exact under any
split.  Steps without re-encoded generated tokens (all normal prefills and decodes) never come here.

Cost: the generated part costs what decoding it cost (one segment run per generated token of the longest resumed
request), inside a single engine step.  `LCKV_EXACT_RECOMPUTE=0` (or `--hf-overrides
'{"lckv_exact_recompute": false}'`) switches back to the cheaper m+b-pass approximation.

The per-request prompt lengths come from vLLM's model runner (`vllm_patches.py`, item 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch

logger = logging.getLogger("lckv_vllm")

EXACT_ENV = "LCKV_EXACT_RECOMPUTE"


def exact_recompute_enabled(hf_config) -> bool:
    """On unless `LCKV_EXACT_RECOMPUTE` says 0/false/no/off or the config carries `lckv_exact_recompute: false`."""
    env = os.environ.get(EXACT_ENV)
    if env is not None and env.strip():
        value = env.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{EXACT_ENV}={env!r}: expected 1/true/yes/on or 0/false/no/off")
    return bool(getattr(hf_config, "lckv_exact_recompute", True))


@dataclasses.dataclass
class Part:
    """Some of the step's tokens (`rows`, indices into the step) with attention metadata describing just them."""

    rows: torch.Tensor
    md: object
    passes: int


def _sub_metadata(md, reqs: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, qsl: torch.Tensor,
                  ctx: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Metadata for a sub-step: request `reqs[i]` contributes its step tokens [starts[i], starts[i] + lens[i])."""
    rows = torch.cat([torch.arange(int(qsl[r] + s), int(qsl[r] + s + n)) for r, s, n in
                      zip(reqs.tolist(), starts.tolist(), lens.tolist())])
    new_qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
    new_qsl[1:] = lens.cumsum(0)
    seq_lens = (ctx[reqs] + starts + lens).to(torch.int32)
    device = md.query_start_loc.device
    rows_dev = rows.to(device)
    sub = dataclasses.replace(
        md,
        num_actual_tokens=int(rows.numel()),
        num_reqs=int(reqs.numel()),
        max_query_len=int(lens.max()),
        max_seq_len=int(seq_lens.max()),
        query_start_loc=new_qsl.to(device),
        seq_lens=seq_lens.to(device),
        block_table=md.block_table.index_select(0, reqs.to(md.block_table.device)),
        slot_mapping=md.slot_mapping.index_select(0, rows_dev),
        query_start_loc_cpu=new_qsl,
        seq_lens_cpu=seq_lens,
        cache={},
    )
    return rows_dev, sub


def plan_step(md, num_prompt_tokens, num_passes: int) -> list[Part] | None:
    """The parts of this step in the order they must run, or None when plain iterative prefill is exact here
    (no request re-encodes generated tokens in a multi-token step)."""
    if num_prompt_tokens is None or md is None or md.max_query_len <= 1:
        return None  # decode-only steps (the common case) cost one comparison here
    B = md.num_reqs
    if len(num_prompt_tokens) < B:
        logger.warning("LCKV: %d prompt lengths for %d requests; re-encoding approximately", len(num_prompt_tokens), B)
        return None
    qsl = (md.query_start_loc_cpu if md.query_start_loc_cpu is not None else md.query_start_loc)[: B + 1].cpu().long()
    sl = (md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens)[:B].cpu().long()
    q_lens = qsl[1:] - qsl[:-1]
    ctx = sl - q_lens
    prompt = torch.as_tensor(num_prompt_tokens[:B]).long()
    n_prompt = torch.minimum((prompt - ctx).clamp(min=0), q_lens)
    n_gen = q_lens - n_prompt
    if not bool(((n_gen > 0) & (q_lens > 1)).any()):
        return None
    parts = []
    reqs = (n_prompt > 0).nonzero().flatten()
    if reqs.numel():
        rows, sub = _sub_metadata(md, reqs, torch.zeros_like(reqs), n_prompt[reqs], qsl, ctx)
        parts.append(Part(rows, sub, max(1, min(num_passes, sub.max_query_len))))
    for j in range(int(n_gen.max())):
        reqs = (n_gen > j).nonzero().flatten()
        rows, sub = _sub_metadata(md, reqs, n_prompt[reqs] + j, torch.ones_like(reqs), qsl, ctx)
        parts.append(Part(rows, sub, 1))
    logger.debug("LCKV: exact re-encoding of %d generated tokens in %d sub-steps", int(n_gen.sum()), len(parts))
    return parts


@contextlib.contextmanager
def metadata_swapped(md):
    """Make `md` the attention metadata of every layer for the duration (vLLM's forward context holds one entry per
    layer name; all LCKV producers share one KV-cache group, hence one metadata object)."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    saved = ctx.attn_metadata
    ctx.attn_metadata = {name: md for name in saved}
    try:
        yield
    finally:
        ctx.attn_metadata = saved
