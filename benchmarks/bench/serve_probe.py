"""lckv-serve with one more stat logger: the benchmark's view of preemptions and concurrency while it serves.

    python benchmarks/bench/serve_probe.py MODEL [lckv-serve options]      (LCKV_BENCH_STATS=FILE)

Runs `lckv-serve` unchanged (its `main()`), except that `AsyncLLM.from_engine_args` gets one extra entry in
`stat_loggers=` (vLLM's public hook for per-step statistics): a logger that counts the preemptions of every
step (`IterationStats.num_preempted_reqs`) and keeps the most requests the scheduler ran in one step
(`SchedulerStats.num_running_reqs`; FILE.reset, when it exists, restarts that maximum), and rewrites FILE (JSON)
whenever either changes.  lckv-serve's /metrics shows the current running count only, and no preemptions.
"""

from __future__ import annotations

import json
import os
import sys


def _install(path: str) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    state = {"preemptions": 0, "max_running": 0}
    reset = f"{path}.reset"

    def write() -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)

    class BenchStats(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            changed = False
            if os.path.exists(reset):  # the benchmark starts a new load: a new maximum
                os.unlink(reset)
                state["max_running"] = 0
                changed = True
            if scheduler_stats is not None and scheduler_stats.num_running_reqs > state["max_running"]:
                state["max_running"] = int(scheduler_stats.num_running_reqs)
                changed = True
            if iteration_stats is not None and iteration_stats.num_preempted_reqs:
                state["preemptions"] += int(iteration_stats.num_preempted_reqs)
                changed = True
            if changed:
                write()

        def log_engine_initialized(self):
            write()

    original = AsyncLLM.from_engine_args.__func__

    def from_engine_args(cls, *args, stat_loggers=None, **kwargs):
        return original(cls, *args, stat_loggers=list(stat_loggers or []) + [BenchStats], **kwargs)

    AsyncLLM.from_engine_args = classmethod(from_engine_args)


def main() -> int:
    path = os.environ.get("LCKV_BENCH_STATS")
    if path:
        _install(path)
    from lckv_vllm.server.cli import main as serve

    sys.argv[0] = "lckv-serve"
    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
