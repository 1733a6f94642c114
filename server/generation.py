"""The request handling both OpenAI endpoints share, between the parsed body and the engine's outputs.

A request goes: schema validation (pydantic, schemas.py) -> model name -> tokenization -> the checks that need the
model (vocabulary, context length, logprob limit) -> SamplingParams (vLLM validates them too; its complaints become
400s) -> the structured-output backend's check of `response_format` (400) -> admission (--max-queued-requests) ->
the engine.  This module holds the steps that do not depend on the endpoint (the limit checks, `sampling_params`,
`check_response_format`, `admit`), the bookkeeping of one request's choices (`Run`, finish reasons) and the token
and logprob values the endpoints format (`token_str`, `logprob`); completions.py and chat.py build the jobs and the
responses.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .engine import EngineFrontend, Job
from .errors import APIError, bad_request, from_engine_exception
from .metrics import ServerMetrics
from .schemas import PromptTokensDetails, SamplingFields, Usage
from .sse import ClientGone


def ids_check(fe: EngineFrontend, ids: list[int], where: str) -> None:
    bad = next((t for t in ids if not 0 <= t < fe.vocab_size), None)
    if bad is not None:
        raise bad_request(f"{where}: token id {bad} is outside the vocabulary [0, {fe.vocab_size})", param="prompt",
                          code="invalid_token_id")


def context_check(fe: EngineFrontend, prompt_len: int, max_tokens: int | None, what: str, param: str) -> int:
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


def check_caps(fe: EngineFrontend, req: SamplingFields, max_tokens: int | None, explicit: bool,
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


def logprob(x: float) -> float:
    """A logprob JSON can carry: -inf (and NaN, should a model produce one) become -9999.0 as in OpenAI's API."""
    return x if x >= -9999.0 else -9999.0  # False for NaN too


def sampling_params(fe: EngineFrontend, req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    for name, value in (("logprobs", logprobs),):
        if value is not None and fe.max_logprobs >= 0 and value > fe.max_logprobs:
            raise bad_request(f"{name} must be at most {fe.max_logprobs}, got {value}", param=name)
    if req.stop_token_ids:
        ids_check(fe, req.stop_token_ids, "stop_token_ids")
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
            ids_check(fe, [tid], "logit_bias")
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


async def check_response_format(fe: EngineFrontend, req: SamplingFields, params) -> None:
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


def token_str(fe: EngineFrontend, tid: int, lp) -> str:
    s = getattr(lp, "decoded_token", None)
    return s if s is not None else fe.token_text(tid)


class Run:
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


async def collect(run: Run, stream: AsyncIterator, on_output) -> None:
    try:
        async for job_index, out in stream:
            for item in run.absorb(job_index, out):
                on_output(job_index, *item)
    except (APIError, ClientGone, asyncio.CancelledError):
        raise
    except Exception as e:
        raise from_engine_exception(e) from None


def admit(fe: EngineFrontend, metrics: ServerMetrics, sequences: int) -> None:
    try:
        fe.admit(sequences)
    except APIError as e:
        if e.status == 503:
            metrics.rejected.inc()
        raise
