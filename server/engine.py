"""The server's only door to the model: a thin front end over vLLM's `AsyncLLM`.

It reads what the HTTP layer must know from the engine (served names, context length, vocabulary, tokenizer, chat
template, KV layout), tokenizes off the event loop, admits requests against `--max-queued-requests`, and runs each
generation in its own asyncio task (`stream_outputs`) so that an HTTP-side cancellation never interrupts the
engine-side abort (see the comment there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .errors import APIError
from .metrics import EngineStats, KVLayout
from .schemas import MAX_N

logger = logging.getLogger("lckv_vllm.server")

# Strong references to fire-and-forget tasks (asyncio keeps only weak ones).
_BACKGROUND: set[asyncio.Task] = set()


def _spawn(coro) -> asyncio.Task:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


@dataclass
class Job:
    """One engine request: a tokenized prompt, its id and its LoRA adapter (None: the base model)."""

    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    lora: object = None


class EngineFrontend:
    def __init__(self, engine, *, served_model_names: list[str], model_path: str,
                 max_queued_requests: int | None = None, stats: EngineStats | None = None,
                 max_n: int | None = None, max_tokens_limit: int | None = None,
                 prefill_telemetry: bool = False, lora_modules: dict[str, str] | None = None) -> None:
        self.engine = engine
        vc = engine.vllm_config
        mc = engine.model_config
        self.served_model_names = list(served_model_names)
        self.model_name = self.served_model_names[0]
        # --lora-modules: each adapter is a model name of its own; requests naming it run with that adapter
        from vllm.lora.request import LoRARequest

        self.adapters = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(
            (lora_modules or {}).items())}
        self.model_path = model_path
        self.created = int(time.time())
        self.max_model_len = int(mc.max_model_len)
        self.vocab_size = int(mc.get_vocab_size())
        self.max_logprobs = int(mc.max_logprobs)
        self.max_num_seqs = int(vc.scheduler_config.max_num_seqs)
        self.default_sampling: dict[str, Any] = dict(mc.get_diff_sampling_param() or {})
        self.tokenizer = engine.get_tokenizer()
        self.stats = stats or EngineStats()
        self.kv = KVLayout.from_vllm_config(vc)
        # --max-queued-requests N: N sequences may wait beyond the max_num_seqs the engine runs at once.
        self.max_queued_requests = max_queued_requests
        self.capacity = None if max_queued_requests is None else self.max_num_seqs + max_queued_requests
        self.admitted = 0
        # Per-request caps (--max-n, --max-tokens-limit): choices per prompt, and tokens generated per choice.
        self.max_n = min(max_n or MAX_N, MAX_N)
        self.max_tokens_limit = max_tokens_limit
        # Tokenization stays off the event loop (a long prompt takes milliseconds).  vLLM's tokenizer is thread-safe
        # (it routes calls through a pool of copies); one worker is enough and keeps CPU use bounded.
        self._tok_pool = ThreadPoolExecutor(1, thread_name_prefix="lckv-tokenizer")
        # Convergence telemetry of the iterative prefill, asked of the engine process per /metrics scrape (the
        # worker extension `worker_ext.ServerWorkerExtension`); the last answer is kept if one is late.
        self.prefill_telemetry = prefill_telemetry
        self.prefill_stats: dict | None = None

    async def refresh_prefill_stats(self, timeout: float = 2.0) -> dict | None:
        """Ask the engine for the prefill telemetry (rank 0's: every tensor-parallel rank runs the same passes;
        under pipeline parallelism the stage that holds a cyclic segment)."""
        if not self.prefill_telemetry or not self.healthy:
            return self.prefill_stats
        try:
            answers = await asyncio.wait_for(self.engine.collective_rpc("lckv_prefill_stats"), timeout)
        except Exception as e:  # a busy or stopping engine: keep the last answer, /metrics must still answer
            logger.debug("prefill telemetry unavailable: %s", type(e).__name__)
            return self.prefill_stats
        found = [a for a in answers or [] if a]
        if found:
            self.prefill_stats = max(found, key=lambda a: a["prefills"])
        return self.prefill_stats

    # ---- model facts ---------------------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """Every name a request may give: the served model's, then the LoRA adapters'."""
        return self.served_model_names + [n for n in self.adapters if n not in self.served_model_names]

    def resolve_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return name or self.model_name
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise APIError(404, f"the model '{shown}' does not exist; this server serves "
                            f"{', '.join(repr(n) for n in self.model_names)}", param="model",
                       code="model_not_found")

    def lora_for(self, name: str):
        """The LoRA request of model name `name` (None: the base model)."""
        return self.adapters.get(name)

    @property
    def max_tokens_cap(self) -> int:
        """The largest max_tokens any request may ask for: the context less one prompt token, or the cap."""
        cap = self.max_model_len - 1
        return cap if self.max_tokens_limit is None else min(cap, self.max_tokens_limit)

    @property
    def healthy(self) -> bool:
        return not self.engine.errored

    def num_unfinished(self) -> int:
        try:
            return int(self.engine.get_num_unfinished_requests())
        except Exception:  # a dead engine may not answer; the health gauge says so
            return 0

    # ---- tokenizer -----------------------------------------------------------------------------------------------
    async def _in_pool(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, lambda: fn(*args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(await self._in_pool(self.tokenizer.encode, text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> tuple[str, list[int]]:
        """Apply the model's chat template; the template writes the special tokens (BOS), so none are added."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")

        def render():
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

        try:
            text = await self._in_pool(render)
        except Exception as e:  # jinja2 TemplateError and friends: the conversation does not fit the template
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        return text, await self.encode(text, add_special_tokens=False)

    # ---- structured outputs --------------------------------------------------------------------------------------
    async def check_structured_outputs(self, structured) -> None:
        """Validate a structured-output constraint (vLLM's `StructuredOutputsParams`) as the engine's input
        processor will: `SamplingParams.verify` with the engine's structured-output configuration, which has the
        configured backend compile the schema.  Raises vLLM's VLLMValidationError (or ValueError) when the backend
        cannot use it.  Runs on a copy (the check records the backend it chose) and off the event loop (compiling a
        large schema takes a while)."""
        import copy

        from vllm import SamplingParams

        vc = self.engine.vllm_config
        config = getattr(vc, "structured_outputs_config", None)
        if config is None:  # a stand-in engine (tests)
            return
        probe = SamplingParams(max_tokens=1, structured_outputs=copy.deepcopy(structured))
        await self._in_pool(probe.verify, self.engine.model_config, getattr(vc, "speculative_config", None), config,
                            self.tokenizer)

    # ---- admission -----------------------------------------------------------------------------------------------
    def admit(self, sequences: int) -> None:
        """Reserve `sequences` slots or refuse with 503 (the caller must `release` them)."""
        if self.capacity is not None:
            if sequences > self.capacity:
                raise APIError(400, f"the request needs {sequences} sequences (prompts x n) but this server runs "
                                    f"at most {self.capacity} at once (max_num_seqs {self.max_num_seqs} + "
                                    f"--max-queued-requests {self.max_queued_requests})", param="n")
            if self.admitted + sequences > self.capacity:
                raise APIError(503, f"the server is at its queue limit ({self.admitted} sequences admitted, "
                                    f"limit {self.capacity}); retry later", code="queue_full",
                               headers={"Retry-After": "1"})
        self.admitted += sequences

    def release(self, sequences: int) -> None:
        self.admitted -= sequences

    # ---- generation ----------------------------------------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # already finished, or the engine is gone: nothing left to free
            logger.debug("abort of %s failed", request_id, exc_info=True)

    async def stream_outputs(self, jobs: list[Job], params) -> AsyncIterator[tuple[int, Any]]:
        """Yield (job index, RequestOutput) for all jobs as the engine produces them.

        Each job runs `AsyncLLM.generate` in a task of its own.  When the consumer goes away (client disconnect:
        Starlette cancels the response inside an anyio cancel scope, which re-cancels every await in that scope)
        we only `cancel()` those tasks: each receives exactly one CancelledError, on which `AsyncLLM.generate`
        awaits its own abort undisturbed, and the job's `finally` aborts by id once more for the case where the
        cancellation arrived before `generate` had registered the request.  Without the separate tasks the abort
        message to the engine core could itself be cancelled, leaving the request running in the engine.
        """
        from vllm.inputs import tokens_input

        queue: asyncio.Queue = asyncio.Queue()
        done_marker = object()

        async def run(index: int, job: Job) -> None:
            finished = False
            try:
                prompt = tokens_input(job.prompt_ids, prompt=job.prompt_text)
                async for out in self.engine.generate(prompt, params, job.request_id, lora_request=job.lora):
                    finished = finished or out.finished
                    queue.put_nowait((index, out, None))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which maps it to an HTTP error
                queue.put_nowait((index, None, e))
            finally:
                if not finished:
                    await self.abort(job.request_id)
                queue.put_nowait((index, done_marker, None))

        tasks = [_spawn(run(i, job)) for i, job in enumerate(jobs)]
        try:
            remaining = len(tasks)
            while remaining:
                index, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is done_marker:
                    remaining -= 1
                    continue
                yield index, out
        finally:
            for t in tasks:
                t.cancel()
            try:
                await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
            except asyncio.CancelledError:  # our own scope is being cancelled; the tasks finish by themselves
                pass

    def shutdown(self) -> None:
        self._tok_pool.shutdown(wait=False, cancel_futures=True)
