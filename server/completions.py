"""`/v1/completions`: OpenAI's legacy completions endpoint, plain and streamed.

One engine job per prompt (a string, a list of token ids, or a batch of either), `n` choices each; `echo` puts the
prompt (and, with `logprobs`, its prompt logprobs) in front of each choice.  The shared steps (checks, sampling
parameters, admission, bookkeeping) are generation.py's; the streamed form goes through sse.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .engine import EngineFrontend, Job
from .generation import (Run, admit, check_caps, check_response_format, collect, context_check, ids_check, logprob,
                         sampling_params, token_str)
from .metrics import ServerMetrics
from .schemas import CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse
from .sse import SSEResponse, sse, stream_events, until_disconnect


def _completion_logprobs(fe: EngineFrontend, token_ids, logprobs, offset: int) -> CompletionLogprobs:
    """Legacy completions logprobs for a run of tokens; `offset` is the text offset of the first one."""
    out = CompletionLogprobs()
    for tid, lp_dict in zip(token_ids, logprobs or []):
        if lp_dict is None:  # the first prompt token has no logprob
            tok = fe.token_text(tid)
            out.tokens.append(tok)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = lp_dict.get(tid)
            tok = token_str(fe, tid, chosen)
            out.tokens.append(tok)
            out.token_logprobs.append(logprob(chosen.logprob) if chosen is not None else None)
            out.top_logprobs.append({token_str(fe, t, lp): logprob(lp.logprob) for t, lp in lp_dict.items()})
        out.text_offset.append(offset)
        offset += len(tok)
    return out


async def _completion_jobs(fe: EngineFrontend, req: CompletionRequest, base_id: str, lora) -> list[Job]:
    p = req.prompt
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    jobs = []
    for i, item in enumerate(prompts):
        where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
        if isinstance(item, str):
            ids = await fe.encode(item)
            text = item
        else:
            ids = list(item)
            ids_check(fe, ids, where)
            text = None
        jobs.append(Job(f"{base_id}-{i}", ids, text, lora))
    return jobs


async def create_completion(fe: EngineFrontend, metrics: ServerMetrics, req: CompletionRequest,
                            raw: Request) -> Response:
    model = fe.resolve_model(req.model)
    requested = check_caps(fe, req, req.max_tokens, "max_tokens" in req.model_fields_set, "max_tokens")
    base_id = f"cmpl-{uuid.uuid4().hex}"
    jobs = await _completion_jobs(fe, req, base_id, fe.lora_for(model))
    # per prompt; with max_tokens null "the rest of the context": the smallest, so that all of them fit
    max_tokens = min(context_check(fe, len(job.prompt_ids), requested,
                                   "the prompt" if len(jobs) == 1 else f"prompt {i}", "prompt")
                     for i, job in enumerate(jobs))
    params = sampling_params(fe, req, max_tokens=max_tokens, logprobs=req.logprobs,
                             prompt_logprobs=req.logprobs if (req.echo and req.logprobs is not None) else None)
    await check_response_format(fe, req, params)
    sequences = len(jobs) * req.n
    admit(fe, metrics, sequences)
    metrics.prompt_tokens.inc(sum(len(j.prompt_ids) for j in jobs))
    run = Run(fe, metrics, "/v1/completions", jobs, req.n)
    created = int(time.time())

    def prompt_text(job: Job) -> str:
        return job.prompt_text if job.prompt_text is not None else fe.decode(job.prompt_ids)

    if not req.stream:
        logprob_parts: dict[int, list[tuple[list[int], Any]]] = {}

        def keep(job_index, idx, c, st):
            if req.logprobs is not None:
                logprob_parts.setdefault(idx, []).append((list(c.token_ids), c.logprobs))

        try:
            await until_disconnect(collect(run, fe.stream_outputs(jobs, params), keep), raw)
        finally:
            fe.release(sequences)
        choices = []
        for idx, st in enumerate(run.choices):
            job = jobs[idx // req.n]
            text = "".join(st.text)
            lp = None
            if req.logprobs is not None:
                ids = [t for part in logprob_parts.get(idx, []) for t in part[0]]
                lps = [x for part in logprob_parts.get(idx, []) for x in (part[1] or [])]
                if req.echo:
                    plp = run.prompt_logprobs.get(idx // req.n) or [None] * len(job.prompt_ids)
                    head = _completion_logprobs(fe, job.prompt_ids, plp, 0)
                    offset = sum(len(t) for t in head.tokens)
                    tail = _completion_logprobs(fe, ids, lps, offset)
                    lp = CompletionLogprobs(tokens=head.tokens + tail.tokens,
                                            token_logprobs=head.token_logprobs + tail.token_logprobs,
                                            top_logprobs=head.top_logprobs + tail.top_logprobs,
                                            text_offset=head.text_offset + tail.text_offset)
                else:
                    lp = _completion_logprobs(fe, ids, lps, 0)
            if req.echo:
                text = prompt_text(job) + text
            choices.append(CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=st.finish_reason,
                                            stop_reason=st.stop_reason))
        body = CompletionResponse(id=base_id, created=created, model=model, choices=choices, usage=run.usage())
        return JSONResponse(body.model_dump())

    async def events() -> AsyncIterator[str]:
        offsets = [0] * len(run.choices)

        def emit(idx, c, st) -> str:
            lp = None
            if req.logprobs is not None:
                lp = _completion_logprobs(fe, list(c.token_ids), c.logprobs, offsets[idx])
                offsets[idx] += sum(len(t) for t in lp.tokens)
            return sse(CompletionChunk(id=base_id, created=created, model=model, choices=[
                CompletionChoice(index=idx, text=c.text, logprobs=lp, finish_reason=st.finish_reason,
                                 stop_reason=st.stop_reason)]))

        if req.echo:  # the prompt first, as its own chunk per choice
            for idx in range(len(run.choices)):
                text = prompt_text(jobs[idx // req.n])
                offsets[idx] = len(text)
                yield sse(CompletionChunk(id=base_id, created=created, model=model,
                                          choices=[CompletionChoice(index=idx, text=text)]))
        usage = (lambda: sse(CompletionChunk(id=base_id, created=created, model=model, choices=[],
                                             usage=run.usage()))) if req.include_usage else None
        async for event in stream_events(run, fe.stream_outputs(jobs, params), emit, usage):
            yield event

    return SSEResponse(events(), on_close=lambda: fe.release(sequences))
