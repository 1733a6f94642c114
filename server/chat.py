"""`/v1/chat/completions`: OpenAI's chat endpoint, plain and streamed.

The messages are rendered with the checkpoint's chat template into one engine job with `n` choices; a stream opens
every choice with the assistant role, as OpenAI does.  The shared steps (checks, sampling parameters, admission,
bookkeeping) are generation.py's; the streamed form goes through sse.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .engine import EngineFrontend, Job
from .generation import (Run, admit, check_caps, check_response_format, collect, context_check, logprob,
                         sampling_params, token_str)
from .metrics import ServerMetrics
from .schemas import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    TokenLogprob,
    TopLogprob,
)
from .sse import SSEResponse, sse, stream_events, until_disconnect


def _chat_logprobs(fe: EngineFrontend, token_ids, logprobs, top_n: int) -> ChatLogprobs:
    content = []
    for tid, lp_dict in zip(token_ids, logprobs or []):
        chosen = lp_dict.get(tid)
        tok = token_str(fe, tid, chosen)
        ranked = sorted(lp_dict.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
        top = [TopLogprob(token=token_str(fe, t, lp), logprob=logprob(lp.logprob),
                          bytes=list(token_str(fe, t, lp).encode("utf-8"))) for t, lp in ranked[:top_n]]
        content.append(TokenLogprob(token=tok, logprob=logprob(chosen.logprob) if chosen else -9999.0,
                                    bytes=list(tok.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)


async def create_chat_completion(fe: EngineFrontend, metrics: ServerMetrics, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    model = fe.resolve_model(req.model)
    requested = check_caps(fe, req, req.token_limit, True,
                           "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    base_id = f"chatcmpl-{uuid.uuid4().hex}"
    messages = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    text, ids = await fe.render_chat(messages, req.add_generation_prompt)
    max_tokens = context_check(fe, len(ids), requested, "the conversation (after the chat template)",
                               "messages")
    top_n = req.top_logprobs or 0
    params = sampling_params(fe, req, max_tokens=max_tokens, logprobs=top_n if req.logprobs else None,
                             prompt_logprobs=None)
    await check_response_format(fe, req, params)
    jobs = [Job(f"{base_id}-0", ids, text, fe.lora_for(model))]
    admit(fe, metrics, req.n)
    metrics.prompt_tokens.inc(len(ids))
    run = Run(fe, metrics, "/v1/chat/completions", jobs, req.n)
    created = int(time.time())

    if not req.stream:
        parts: dict[int, list[tuple[list[int], Any]]] = {}

        def keep(job_index, idx, c, st):
            if req.logprobs:
                parts.setdefault(idx, []).append((list(c.token_ids), c.logprobs))

        try:
            await until_disconnect(collect(run, fe.stream_outputs(jobs, params), keep), raw)
        finally:
            fe.release(req.n)
        choices = []
        for idx, st in enumerate(run.choices):
            lp = None
            if req.logprobs:
                tids = [t for p in parts.get(idx, []) for t in p[0]]
                lps = [x for p in parts.get(idx, []) for x in (p[1] or [])]
                lp = _chat_logprobs(fe, tids, lps, top_n)
            choices.append(ChatChoice(index=idx, message=ChatResponseMessage(content="".join(st.text)), logprobs=lp,
                                      finish_reason=st.finish_reason, stop_reason=st.stop_reason))
        body = ChatCompletionResponse(id=base_id, created=created, model=model, choices=choices, usage=run.usage())
        return JSONResponse(body.model_dump())

    async def events() -> AsyncIterator[str]:
        def emit(idx, c, st) -> str:
            lp = _chat_logprobs(fe, list(c.token_ids), c.logprobs, top_n) if req.logprobs else None
            return sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[
                ChatStreamChoice(index=idx, delta=ChatDelta(content=c.text), logprobs=lp,
                                 finish_reason=st.finish_reason)]))

        for idx in range(req.n):  # OpenAI opens every choice with the role
            yield sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[
                ChatStreamChoice(index=idx, delta=ChatDelta(role="assistant", content=""))]))
        usage = (lambda: sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[],
                                                 usage=run.usage()))) if req.include_usage else None
        async for event in stream_events(run, fe.stream_outputs(jobs, params), emit, usage):
            yield event

    return SSEResponse(events(), on_close=lambda: fe.release(req.n))
