"""Exact re-encoding of preempted requests for cyclic plans (docs/semantics.md, "preemption").

When the KV cache is full, vLLM preempts a request and later recomputes its KV by prefilling prompt + generated
tokens in one step.  The original run encoded the prompt iteratively (m+b passes) and then each generated token
exactly, one per step; iterating m+b passes over prompt + generated tokens instead gives different KVs beyond m+b
tokens, so a request's output would depend on whether the server happened to be full.

This module redoes the original order inside that one step.  For every cyclic segment:
1. the prompt part of the step's tokens (per request, the tokens before `num_prompt_tokens`) is encoded as a
   prefill of its own: producer slots zeroed, up to `plan.prefill_passes(longest prompt part)` passes, stopping per
   sequence as adaptive prefill does (`prefill.py`) — the same computation as the request's first prefill (prompt
   tokens never see later tokens, and the adaptive stop is causal);
2. the generated part is then encoded one token per request at a time, each a one-pass step with the context so
   far, like the decode steps that produced those tokens.
Each part runs with attention metadata of its own (a sub-step, `attention.step.substep`: its tokens, context
lengths, slots), swapped into vLLM's forward context for the duration (`attention/context.metadata_swapped`);
acyclic segments run once over the whole step, which is exact under any split.  Steps without re-encoded generated
tokens (all normal prefills and decodes) never come here.

Cost: the generated part costs what decoding it cost (one segment run per generated token of the longest resumed
request), inside a single engine step.  `LCKV_EXACT_RECOMPUTE=0` (or `--hf-overrides
'{"lckv_exact_recompute": false}'`) switches back to the cheaper m+b-pass approximation.

The per-request prompt lengths come from vLLM's model runner onto the step (`LCKVStep.prompt_lens`,
`vllm_patches.py` item 4).  Whether this runs at all is `Settings.exact_recompute`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .attention.step import LCKVStep, substep
from ..plan import LayerPlan

logger = logging.getLogger("lckv_vllm")


def generated_only(step: LCKVStep) -> torch.Tensor:
    """Per request of the step: True when every token it has in the step is a generated one (a speculative
    verify step, or the tail of a resumed request), so not a prefill (telemetry)."""
    prompt = torch.as_tensor(step.prompt_lens[: step.num_reqs]).long()
    return step.context_lens_cpu >= prompt


@dataclasses.dataclass
class Part:
    """Some of the step's tokens (`rows`, indices into the step) with a sub-step describing just them."""

    rows: torch.Tensor
    step: LCKVStep
    passes: int
    reqs: torch.Tensor  # the part's requests, as indices into the step's (host)


def plan_step(step: LCKVStep, plan: LayerPlan) -> list[Part] | None:
    """The parts of this step in the order they must run, or None when plain iterative prefill is exact here
    (no request re-encodes generated tokens in a multi-token step)."""
    if step.is_decode_only or step.prompt_lens is None:
        return None  # decode-only steps (the common case) cost one comparison here
    B = step.num_reqs
    if len(step.prompt_lens) < B:
        logger.warning("LCKV: %d prompt lengths for %d requests; re-encoding approximately", len(step.prompt_lens), B)
        return None
    q_lens, ctx = step.query_lens_cpu, step.context_lens_cpu
    prompt = torch.as_tensor(step.prompt_lens[:B]).long()
    n_prompt = torch.minimum((prompt - ctx).clamp(min=0), q_lens)
    n_gen = q_lens - n_prompt
    if not bool(((n_gen > 0) & (q_lens > 1)).any()):
        return None
    parts = []
    reqs = (n_prompt > 0).nonzero().flatten()
    if reqs.numel():
        rows, sub = substep(step, reqs, torch.zeros_like(reqs), n_prompt[reqs])
        parts.append(Part(rows, sub, plan.prefill_passes(sub.max_query_len), reqs))
    for j in range(int(n_gen.max())):
        reqs = (n_gen > j).nonzero().flatten()
        rows, sub = substep(step, reqs, n_prompt[reqs] + j, torch.ones_like(reqs))
        parts.append(Part(rows, sub, 1, reqs))
    logger.debug("LCKV: exact re-encoding of %d generated tokens in %d sub-steps", int(n_gen.sum()), len(parts))
    return parts
