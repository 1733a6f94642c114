"""The worker extension lckv-serve starts every engine with: what the HTTP process asks of the model's process.

vLLM runs the model in its engine process (one worker per rank); the only sanctioned door from the API server into
it is `AsyncLLM.collective_rpc`, which calls a method of the worker class, extended with `worker_extension_cls`.
Methods:

* `lckv_prefill_stats()`: the convergence telemetry of the LCKV model's iterative prefill (`lckv_vllm.engine.prefill.
  PrefillStats.snapshot()`), or None for a model without it; shown on /metrics (`server/metrics.py`);
* `lckv_arm_fault(pattern)`: the test-only fault injection (`faults.py`).
"""

from __future__ import annotations

from .faults import FaultInjection

EXTENSION = "lckv_vllm.server.worker_ext.ServerWorkerExtension"


class ServerWorkerExtension(FaultInjection):
    def lckv_prefill_stats(self) -> dict | None:
        model = getattr(getattr(self, "model_runner", None), "model", None)
        prefill = getattr(getattr(model, "model", None), "prefill", None)
        return None if prefill is None else prefill.stats.snapshot()
