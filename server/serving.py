"""The OpenAI endpoints proper: /v1/completions and /v1/chat/completions, plain and streamed.

A request goes: schema validation (pydantic, schemas.py) -> model name -> tokenization -> the checks that need the
model (vocabulary, context length, logprob limit) -> SamplingParams (vLLM validates them too; its complaints become
400s) -> the structured-output backend's check of `response_format` (400) -> admission (--max-queued-requests) ->
the engine.  Plain responses race the generation against the client's disconnect; streamed ones are Server-Sent
Events in OpenAI's chunk format ending with `data: [DONE]`.  Either way a client that goes away gets its engine
requests aborted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .engine import EngineFrontend, Job
from .errors import APIError, bad_request, from_engine_exception, sse_error
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
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator.

    Starlette stops iterating when the client disconnects but leaves the async generator suspended until garbage
    collection; closing it here runs the generator's `finally`, which cancels the engine requests right away.
    """

    media_type = "text/event-stream"

    def __init__(self, content, on_close=None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # `on_close` (releasing the admission slots) runs here rather than in the generator's `finally`: a
            # generator that never started has no `finally` to run.
            if self._on_close is not None:
                self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await asyncio.shield(aclose())
                except (asyncio.CancelledError, RuntimeError):
                    pass


async def _wait_disconnect(raw: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (if the client goes away).
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(coro, raw: Request):
    """Await `coro`, or cancel it and raise ClientGone if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientGone()


# ---- shared request handling ----------------------------------------------------------------------------------------


def _ids_check(fe: EngineFrontend, ids: list[int], where: str) -> None:
    bad = next((t for t in ids if not 0 <= t < fe.vocab_size), None)
    if bad is not None:
        raise bad_request(f"{where}: token id {bad} is outside the vocabulary [0, {fe.vocab_size})", param="prompt",
                          code="invalid_token_id")


def _context_check(fe: EngineFrontend, prompt_len: int, max_tokens: int | None, what: str, param: str) -> int:
    """Return the effective max_tokens; 400 when the prompt (plus max_tokens) does not fit the context."""
    limit = fe.max_model_len
    if prompt_len >= limit:
        raise bad_request(f"this model's maximum context length is {limit} tokens, but {what} has {prompt_len} "
                          f"tokens (it must be shorter than {limit} to leave room for one generated token)",
                          param=param, code="context_length_exceeded")
    if max_tokens is None:
        rest = limit - prompt_len
        return rest if fe.max_tokens_limit is None else min(rest, fe.max_tokens_limit)
    if prompt_len + max_tokens > limit:
        raise bad_request(f"this model's maximum context length is {limit} tokens, but {what} has {prompt_len} "
                          f"tokens and max_tokens asks for {max_tokens} more ({prompt_len + max_tokens} in total)",
                          param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _check_caps(fe: EngineFrontend, req: SamplingFields, max_tokens: int | None, explicit: bool,
                param: str) -> int | None:
    """--max-n and --max-tokens-limit, checked before any tokenization; returns max_tokens (a default that is over
    the limit is lowered to it, an explicit one is an error)."""
    if req.n > fe.max_n:
        raise bad_request(f"n must be at most {fe.max_n} on this server, got {req.n}", param="n")
    limit = fe.max_tokens_limit
    if limit is not None and max_tokens is not None and max_tokens > limit:
        if explicit:
            raise bad_request(f"{param} must be at most {limit} on this server, got {max_tokens}", param=param)
        return limit
    return max_tokens


def _logprob(x: float) -> float:
    """A logprob JSON can carry: -inf (and NaN, should a model produce one) become -9999.0 as in OpenAI's API."""
    return x if x >= -9999.0 else -9999.0  # False for NaN too


def _sampling_params(fe: EngineFrontend, req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                     prompt_logprobs: int | None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    for name, value in (("logprobs", logprobs),):
        if value is not None and fe.max_logprobs >= 0 and value > fe.max_logprobs:
            raise bad_request(f"{name} must be at most {fe.max_logprobs}, got {value}", param=name)
    if req.stop_token_ids:
        _ids_check(fe, req.stop_token_ids, "stop_token_ids")
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                          param="min_tokens")
    logit_bias = None
    if req.logit_bias:
        logit_bias = {}
        for k, v in req.logit_bias.items():
            try:
                tid = int(k)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
            _ids_check(fe, [tid], "logit_bias")
            logit_bias[tid] = v
    structured = None  # response_format, mapped as vLLM's own server maps it
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        structured = StructuredOutputsParams(json_object=True)
    elif rf is not None and rf.type == "json_schema":
        structured = StructuredOutputsParams(json=rf.json_schema.schema_)
    d = fe.default_sampling  # the checkpoint's generation_config.json, as vLLM reads it

    def pick(name: str, value, fallback):
        return value if value is not None else d.get(name, fallback)

    kwargs = dict(
        n=req.n,
        temperature=pick("temperature", req.temperature, 1.0),
        top_p=pick("top_p", req.top_p, 1.0),
        top_k=pick("top_k", req.top_k, 0),
        min_p=pick("min_p", req.min_p, 0.0),
        repetition_penalty=pick("repetition_penalty", req.repetition_penalty, 1.0),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=logit_bias,
        structured_outputs=structured,
        # Deltas for both kinds of response: the plain one accumulates them, which also times the first token.
        output_kind=RequestOutputKind.DELTA,
    )
    try:
        return SamplingParams(**kwargs)
    except Exception as e:  # VLLMValidationError (a ValueError) with vLLM's own wording
        raise bad_request(f"invalid sampling parameters: {e}", param=getattr(e, "parameter", None)) from None


async def _check_response_format(fe: EngineFrontend, req: SamplingFields, params) -> None:
    """Ask the structured-output backend whether it can use the request's `response_format` before anything is
    admitted or streamed: the engine would refuse it only once the request is added (a failed stream, after the 200),
    and a schema it cannot compile must be the client's 400, naming the field."""
    if params.structured_outputs is None:
        return
    from vllm.exceptions import VLLMClientError

    try:
        await fe.check_structured_outputs(params.structured_outputs)
    except (VLLMClientError, ValueError) as e:
        param = "response_format.json_schema.schema" if req.response_format.type == "json_schema" else \
            "response_format"
        raise bad_request(f"{param}: the structured-output backend cannot use it: {str(e).strip()}",
                          param=param) from None


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _finish(reason: str | None) -> str | None:
    if reason == "error":
        raise APIError(500, "the engine failed while generating this request (finish_reason 'error')",
                       code="engine_error")
    if reason in (None, "stop", "length"):
        return reason
    return "stop"  # "repetition" and friends: the model stopped on its own accord


def _token_str(fe: EngineFrontend, tid: int, lp) -> str:
    s = getattr(lp, "decoded_token", None)
    return s if s is not None else fe.token_text(tid)


class _Run:
    """Bookkeeping of one HTTP request across its engine jobs: timing, metrics, usage."""

    def __init__(self, fe: EngineFrontend, metrics: ServerMetrics, endpoint: str, jobs: list[Job], n: int):
        self.fe, self.metrics, self.endpoint, self.jobs, self.n = fe, metrics, endpoint, jobs, n
        self.t0 = time.monotonic()
        self.first_token = False
        self.choices = [ChoiceState() for _ in range(len(jobs) * n)]
        self.prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
        self.prompt_logprobs: dict[int, Any] = {}
        self.cached_tokens: dict[int, int] = {}  # job -> prompt tokens served from the prefix cache

    def absorb(self, job_index: int, out) -> list[tuple[int, Any, ChoiceState]]:
        """Fold one delta RequestOutput into the choices; return (choice index, CompletionOutput delta, state)."""
        if out.prompt_logprobs is not None and job_index not in self.prompt_logprobs:
            self.prompt_logprobs[job_index] = out.prompt_logprobs
        if getattr(out, "num_cached_tokens", None) is not None:
            self.cached_tokens[job_index] = int(out.num_cached_tokens)
        changed = []
        for c in out.outputs:
            idx = job_index * self.n + c.index
            st = self.choices[idx]
            new_tokens = len(c.token_ids)
            if new_tokens and not self.first_token:
                self.first_token = True
                self.metrics.ttft.labels(self.endpoint).observe(time.monotonic() - self.t0)
            self.metrics.generation_tokens.inc(new_tokens)
            st.num_tokens += new_tokens
            st.text.append(c.text)
            if c.finish_reason is not None:
                st.finish_reason = _finish(c.finish_reason)
                st.stop_reason = c.stop_reason
            changed.append((idx, c, st))
        return changed

    def usage(self) -> Usage:
        completion = sum(c.num_tokens for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())))


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
            tok = _token_str(fe, tid, chosen)
            out.tokens.append(tok)
            out.token_logprobs.append(_logprob(chosen.logprob) if chosen is not None else None)
            out.top_logprobs.append({_token_str(fe, t, lp): _logprob(lp.logprob) for t, lp in lp_dict.items()})
        out.text_offset.append(offset)
        offset += len(tok)
    return out


def _chat_logprobs(fe: EngineFrontend, token_ids, logprobs, top_n: int) -> ChatLogprobs:
    content = []
    for tid, lp_dict in zip(token_ids, logprobs or []):
        chosen = lp_dict.get(tid)
        tok = _token_str(fe, tid, chosen)
        ranked = sorted(lp_dict.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
        top = [TopLogprob(token=_token_str(fe, t, lp), logprob=_logprob(lp.logprob),
                          bytes=list(_token_str(fe, t, lp).encode("utf-8"))) for t, lp in ranked[:top_n]]
        content.append(TokenLogprob(token=tok, logprob=_logprob(chosen.logprob) if chosen else -9999.0,
                                    bytes=list(tok.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


async def _collect(run: _Run, stream: AsyncIterator, on_output) -> None:
    try:
        async for job_index, out in stream:
            for item in run.absorb(job_index, out):
                on_output(job_index, *item)
    except (APIError, ClientGone, asyncio.CancelledError):
        raise
    except Exception as e:
        raise from_engine_exception(e) from None


def _admit(fe: EngineFrontend, metrics: ServerMetrics, sequences: int) -> None:
    try:
        fe.admit(sequences)
    except APIError as e:
        if e.status == 503:
            metrics.rejected.inc()
        raise


# ---- /v1/completions ------------------------------------------------------------------------------------------------


async def _completion_jobs(fe: EngineFrontend, req: CompletionRequest, base_id: str) -> list[Job]:
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
            _ids_check(fe, ids, where)
            text = None
        jobs.append(Job(f"{base_id}-{i}", ids, text))
    return jobs


async def create_completion(fe: EngineFrontend, metrics: ServerMetrics, req: CompletionRequest,
                            raw: Request) -> Response:
    model = fe.resolve_model(req.model)
    requested = _check_caps(fe, req, req.max_tokens, "max_tokens" in req.model_fields_set, "max_tokens")
    base_id = f"cmpl-{uuid.uuid4().hex}"
    jobs = await _completion_jobs(fe, req, base_id)
    # per prompt; with max_tokens null "the rest of the context": the smallest, so that all of them fit
    max_tokens = min(_context_check(fe, len(job.prompt_ids), requested,
                                    "the prompt" if len(jobs) == 1 else f"prompt {i}", "prompt")
                     for i, job in enumerate(jobs))
    params = _sampling_params(fe, req, max_tokens=max_tokens, logprobs=req.logprobs,
                              prompt_logprobs=req.logprobs if (req.echo and req.logprobs is not None) else None)
    await _check_response_format(fe, req, params)
    sequences = len(jobs) * req.n
    _admit(fe, metrics, sequences)
    metrics.prompt_tokens.inc(sum(len(j.prompt_ids) for j in jobs))
    run = _Run(fe, metrics, "/v1/completions", jobs, req.n)
    created = int(time.time())

    def prompt_text(job: Job) -> str:
        return job.prompt_text if job.prompt_text is not None else fe.decode(job.prompt_ids)

    if not req.stream:
        logprob_parts: dict[int, list[tuple[list[int], Any]]] = {}

        def keep(job_index, idx, c, st):
            if req.logprobs is not None:
                logprob_parts.setdefault(idx, []).append((list(c.token_ids), c.logprobs))

        try:
            await until_disconnect(_collect(run, fe.stream_outputs(jobs, params), keep), raw)
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
            return _sse(CompletionChunk(id=base_id, created=created, model=model, choices=[
                CompletionChoice(index=idx, text=c.text, logprobs=lp, finish_reason=st.finish_reason,
                                 stop_reason=st.stop_reason)]))

        if req.echo:  # the prompt first, as its own chunk per choice
            for idx in range(len(run.choices)):
                text = prompt_text(jobs[idx // req.n])
                offsets[idx] = len(text)
                yield _sse(CompletionChunk(id=base_id, created=created, model=model,
                                           choices=[CompletionChoice(index=idx, text=text)]))
        usage = (lambda: _sse(CompletionChunk(id=base_id, created=created, model=model, choices=[],
                                              usage=run.usage()))) if req.include_usage else None
        async for event in _stream_events(run, fe.stream_outputs(jobs, params), emit, usage):
            yield event

    return SSEResponse(events(), on_close=lambda: fe.release(sequences))


async def _stream_events(run, stream, render, usage) -> AsyncIterator[str]:
    """The engine-output loop shared by both streaming endpoints.

    Each engine output becomes SSE chunks via `render(idx, output, state)`; a request-level error (e.g. a stop
    condition the engine rejects) or an engine failure becomes one error event; the stream ends with the usage
    chunk (when asked and nothing failed) and `[DONE]`.  The engine stream is always closed, which aborts it.
    """
    try:
        async for job_index, out in stream:
            try:
                chunks = [render(*item) for item in run.absorb(job_index, out)]
            except APIError as e:
                yield sse_error(e)
                break
            for chunk in chunks:
                yield chunk
        else:
            if usage is not None:
                yield usage()
    except Exception as e:
        yield sse_error(from_engine_exception(e))
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


# ---- /v1/chat/completions -------------------------------------------------------------------------------------------


async def create_chat_completion(fe: EngineFrontend, metrics: ServerMetrics, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    model = fe.resolve_model(req.model)
    requested = _check_caps(fe, req, req.token_limit, True,
                            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    base_id = f"chatcmpl-{uuid.uuid4().hex}"
    messages = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    text, ids = await fe.render_chat(messages, req.add_generation_prompt)
    max_tokens = _context_check(fe, len(ids), requested, "the conversation (after the chat template)",
                                "messages")
    top_n = req.top_logprobs or 0
    params = _sampling_params(fe, req, max_tokens=max_tokens, logprobs=top_n if req.logprobs else None,
                              prompt_logprobs=None)
    await _check_response_format(fe, req, params)
    jobs = [Job(f"{base_id}-0", ids, text)]
    _admit(fe, metrics, req.n)
    metrics.prompt_tokens.inc(len(ids))
    run = _Run(fe, metrics, "/v1/chat/completions", jobs, req.n)
    created = int(time.time())

    if not req.stream:
        parts: dict[int, list[tuple[list[int], Any]]] = {}

        def keep(job_index, idx, c, st):
            if req.logprobs:
                parts.setdefault(idx, []).append((list(c.token_ids), c.logprobs))

        try:
            await until_disconnect(_collect(run, fe.stream_outputs(jobs, params), keep), raw)
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
            return _sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[
                ChatStreamChoice(index=idx, delta=ChatDelta(content=c.text), logprobs=lp,
                                 finish_reason=st.finish_reason)]))

        for idx in range(req.n):  # OpenAI opens every choice with the role
            yield _sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[
                ChatStreamChoice(index=idx, delta=ChatDelta(role="assistant", content=""))]))
        usage = (lambda: _sse(ChatCompletionChunk(id=base_id, created=created, model=model, choices=[],
                                                  usage=run.usage()))) if req.include_usage else None
        async for event in _stream_events(run, fe.stream_outputs(jobs, params), emit, usage):
            yield event

    return SSEResponse(events(), on_close=lambda: fe.release(req.n))

