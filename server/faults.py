"""Fault injection for tests: make the model runner fail on the step that schedules one chosen prompt.

Set `LCKV_SERVE_FAULT_TOKENS` to comma-separated token ids before starting lckv-serve (tests only; the variable
is read once, at start-up, and the server logs a warning when it is set).  The server then starts the engine with
`FaultInjection` as vLLM's worker extension (`worker_extension_cls`, mixed into the worker class) and arms it through
`collective_rpc`: from then on, a model-runner step that schedules a new request whose prompt contains those ids,
in that order, raises a RuntimeError inside the worker, exactly where an exception in the model's forward pass (a
kernel failure, an out-of-memory error) would surface.  vLLM cannot fail one request of a batch on such an error:
the engine core stops, every request it holds fails with EngineDeadError, and lckv-serve answers them with 500s,
reports 503 on /health and exits with status `cli.ENGINE_DEAD_EXIT` so that its supervisor restarts it.
"""

from __future__ import annotations

import os

ENV = "LCKV_SERVE_FAULT_TOKENS"
EXTENSION = "lckv_vllm.server.faults.FaultInjection"


def fault_tokens_from_env() -> list[int] | None:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        ids = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"lckv-serve: {ENV} must be comma-separated token ids, got {raw!r}") from None
    return ids or None


def _contains(seq: list[int], pattern: list[int]) -> bool:
    n = len(pattern)
    return any(seq[i:i + n] == pattern for i in range(len(seq) - n + 1))


class FaultInjection:
    """vLLM worker extension (its methods become the worker's); see the module docstring."""

    def lckv_arm_fault(self, pattern: list[int]) -> bool:
        runner = self.model_runner
        execute = runner.execute_model
        pattern = [int(t) for t in pattern]

        def failing_execute(scheduler_output, *args, **kwargs):
            for req in getattr(scheduler_output, "scheduled_new_reqs", None) or []:
                ids = list(getattr(req, "prompt_token_ids", None) or [])
                if _contains(ids, pattern):
                    raise RuntimeError("injected fault: the model failed on this batch (" + ENV + ")")
            return execute(scheduler_output, *args, **kwargs)

        runner.execute_model = failing_execute
        return True
