"""Prometheus metrics of lckv-serve (GET /metrics), on a private registry.

A private `CollectorRegistry` keeps our series apart from the ones vLLM registers on the global registry in the
same process (its `vllm:*` metrics), so the names below are exactly what this server promises:

- `lckv_requests_total{endpoint,status}`: answered HTTP requests (status 499: the client went away first);
- `lckv_request_e2e_seconds{endpoint}`, `lckv_request_ttft_seconds{endpoint}`: latency histograms;
- `lckv_requests_running`, `lckv_requests_waiting`: the engine scheduler's view (last step's SchedulerStats);
- `lckv_requests_unfinished`: requests the engine front end still tracks (0 means nothing left to abort);
- `lckv_kv_layers`, `lckv_kv_producing_layers`, `lckv_kv_bytes_per_token`, `lckv_kv_capacity_tokens`,
  `lckv_kv_tokens_per_sequence_max`, `lckv_kv_usage_ratio`, `lckv_kv_used_tokens`: the KV layout of the cross-layer
  plan and its occupancy;
- `lckv_prefill_passes` (histogram: passes over the cyclic segments per prefill, i.e. per request and step with more
  than one token), `lckv_prefill_tokens_total`, `lckv_prefill_recomputed_tokens_total` (rows the passes ran, per
  cyclic segment: / tokens = the passes' cost), `lckv_prefill_last_change` (the relative K/V change measured by the
  last pass of the latest prefill), `lckv_prefill_unconverged_total` (prefills longer than m+b still moving more
  than the tolerance after m+b passes), `lckv_prefill_tolerance`, `lckv_reencoded_total` and
  `lckv_reencoded_tokens_total` (multi-token steps of generated tokens only, encoded one token per sub-step: the
  verify steps of speculative decoding and resumed requests; not counted as prefills): the convergence telemetry
  of the iterative prefill (`lckv_vllm.engine.prefill`), asked of the engine process per scrape (LCKV models only;
  plans without a cyclic segment never iterate and keep every count at 0).

The engine's per-step statistics reach us through a stat logger handed to `AsyncLLM` (`stat_loggers=`), the
public hook vLLM offers for this; `EngineStats` keeps the latest snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version", "/metrics")


@dataclass
class KVLayout:
    """The KV cache layout of the served model, from the layer plan and the engine's cache config."""

    layers: int
    producing_layers: int
    layer_types: str  # the active plan (an --hf-overrides pattern when one was given)
    checkpoint_layer_types: str  # the checkpoint's own plan
    bytes_per_token: int
    full_bytes_per_token: int  # the same model with every layer keeping its KV
    # vLLM's group-aware "KV cache size" (tokens of max-model-len sequences the pool holds), once the engine has
    # allocated its cache; num_blocks * block_size only where vLLM gives none (every token takes one block per
    # KV-cache group, so with windowed pages the pool's block count alone overstates it)
    capacity_tokens: int | None
    block_size: int | None
    sequence_tokens: int | None = None  # most tokens of a sequence kept in KV (streaming / windowed), None: all

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "KVLayout":
        from lckv_vllm.plan import plan_from_config
        from lckv_vllm.settings import load_settings

        mc = vllm_config.model_config
        plan = plan_from_config(mc.hf_config)
        kv_heads = mc.get_num_kv_heads(vllm_config.parallel_config)
        head_dim = mc.get_head_size()
        dtype_bytes = _cache_dtype_bytes(vllm_config)
        cache = vllm_config.cache_config
        block_size = getattr(cache, "block_size", None)
        return cls(
            layers=plan.num_layers,
            producing_layers=len(plan.producers),
            layer_types=plan.layer_types,
            checkpoint_layer_types=getattr(mc.hf_config, "layer_types_overridden_from", None) or plan.layer_types,
            bytes_per_token=plan.kv_bytes_per_token(kv_heads, head_dim, dtype_bytes),
            full_bytes_per_token=plan.full_kv_bytes_per_token(kv_heads, head_dim, dtype_bytes),
            capacity_tokens=_capacity_tokens(cache),
            block_size=block_size,
            sequence_tokens=plan.kv_tokens_per_sequence(load_settings(mc.hf_config).windowed_pages),
        )


def _capacity_tokens(cache_config) -> int | None:
    sized = getattr(cache_config, "kv_cache_size_tokens", None)
    if sized:
        return int(sized)
    blocks, block_size = getattr(cache_config, "num_gpu_blocks", None), getattr(cache_config, "block_size", None)
    return blocks * block_size if blocks and block_size else None


def _cache_dtype_bytes(vllm_config) -> int:
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if cache_dtype.startswith("fp8"):
        return 1
    return vllm_config.model_config.dtype.itemsize


class EngineStats:
    """Latest scheduler statistics of the engine, fed by `stat_logger_factory()`."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.updated: float | None = None

    def update(self, scheduler_stats) -> None:
        self.running = int(scheduler_stats.num_running_reqs)
        self.waiting = int(scheduler_stats.num_waiting_reqs) + int(getattr(scheduler_stats,
                                                                           "num_skipped_waiting_reqs", 0))
        self.kv_usage = float(scheduler_stats.kv_cache_usage)
        self.updated = time.time()

    def stat_logger_factory(self):
        """A per-engine stat logger factory for `AsyncLLM(stat_loggers=[...])` that records into self."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                self.engine_index = engine_index

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    stats.update(scheduler_stats)

            def log_engine_initialized(self):
                pass

        return _Recorder


class PrefillCollector:
    """Renders the engine's latest `PrefillStats.snapshot()` (cumulative counts kept in the engine process)."""

    def __init__(self) -> None:
        self.snapshot: dict | None = None

    def describe(self):
        return []

    def collect(self):
        snap = self.snapshot
        if not snap:
            return
        counts = snap["passes"]  # counts[k]: prefills that used k passes (k = 1 .. m+b)
        buckets, running = [], 0
        for k in range(1, len(counts)):
            running += counts[k]
            buckets.append((str(float(k)), running))
        buckets.append(("+Inf", running))
        total = sum(k * n for k, n in enumerate(counts))
        yield HistogramMetricFamily("lckv_prefill_passes", "Passes over the cyclic segments per prefill (a request's "
                                    "multi-token step); at most m+b", buckets=buckets, sum_value=total)
        yield CounterMetricFamily("lckv_prefill_tokens", "Tokens prefilled through cyclic segments",
                                  value=snap["prefill_tokens"])
        yield CounterMetricFamily("lckv_prefill_recomputed_tokens", "Rows the passes over the cyclic segments ran "
                                  "for those prefills, per segment (divided by lckv_prefill_tokens_total: the "
                                  "passes' cost in passes over every token)", value=snap.get("recomputed_tokens", 0.0))
        yield CounterMetricFamily("lckv_prefill_unconverged", "Prefills longer than m+b tokens whose K/V still moved "
                                  "more than the tolerance after m+b passes", value=snap["unconverged"])
        yield GaugeMetricFamily("lckv_prefill_last_change", "Relative K/V change measured by the last pass of the "
                                "latest prefill", value=snap["last_change"] or 0.0)
        yield GaugeMetricFamily("lckv_prefill_tolerance", "Tolerance of adaptive passes (0: always m+b passes)",
                                value=snap.get("tolerance", 0.0))
        yield CounterMetricFamily("lckv_reencoded", "Requests' multi-token steps of generated tokens only (speculative "
                                  "verify steps, resumed requests), encoded one token per sub-step like decode",
                                  value=snap.get("reencoded", 0))
        yield CounterMetricFamily("lckv_reencoded_tokens", "Tokens of those steps",
                                  value=snap.get("reencoded_tokens", 0))


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.prefill = PrefillCollector()
        r.register(self.prefill)
        self.requests = Counter("lckv_requests", "HTTP requests answered, by endpoint and status "
                                "(499: the client disconnected first)", ["endpoint", "status"], registry=r)
        self.e2e = Histogram("lckv_request_e2e_seconds", "Time from request arrival to the last byte of the "
                             "response", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lckv_request_ttft_seconds", "Time from request arrival to the first generated "
                              "token", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lckv_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("lckv_generation_tokens", "Generated tokens", registry=r)
        self.rejected = Counter("lckv_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        self.running = Gauge("lckv_requests_running", "Requests the engine scheduler is running", registry=r)
        self.waiting = Gauge("lckv_requests_waiting", "Requests waiting in the engine scheduler's queue",
                             registry=r)
        self.unfinished = Gauge("lckv_requests_unfinished", "Requests (sequences) the engine front end still "
                                "tracks", registry=r)
        self.admitted = Gauge("lckv_sequences_admitted", "Sequences admitted by this server and not finished "
                              "(counted against --max-queued-requests)", registry=r)
        self.engine_up = Gauge("lckv_engine_healthy", "1 while the engine is alive", registry=r)
        self.kv_layers = Gauge("lckv_kv_layers", "Decoder layers of the served model", registry=r)
        self.kv_plan = Gauge("lckv_kv_plan_info", "The active layer_types (label) and the checkpoint's; value 1",
                             ["layer_types", "checkpoint_layer_types"], registry=r)
        self.kv_producers = Gauge("lckv_kv_producing_layers", "Layers that compute and store KV (own KV pages)",
                                  registry=r)
        self.kv_bytes = Gauge("lckv_kv_bytes_per_token", "KV cache bytes per token (producing layers only)",
                              registry=r)
        self.kv_full_bytes = Gauge("lckv_kv_full_bytes_per_token", "KV bytes per token if every layer kept its "
                                   "KV (the plain-model baseline)", registry=r)
        self.kv_capacity = Gauge("lckv_kv_capacity_tokens", "Tokens the allocated KV cache can hold", registry=r)
        self.kv_sequence = Gauge("lckv_kv_tokens_per_sequence_max", "Most tokens of one sequence kept in KV per "
                                 "producer (StreamingLLM sinks + window, or the window of an all-windowed plan); 0: "
                                 "the whole sequence", registry=r)
        self.kv_usage = Gauge("lckv_kv_usage_ratio", "Fraction of the KV cache in use (engine scheduler)",
                              registry=r)
        self.kv_used = Gauge("lckv_kv_used_tokens", "Approximate tokens in the KV cache (usage x capacity)",
                             registry=r)

    @staticmethod
    def endpoint_label(path: str) -> str:
        # Unknown paths share one label so that scanners cannot blow up the number of series.
        return path if path in ENDPOINTS else "other"

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        ep = self.endpoint_label(path)
        self.requests.labels(ep, str(status)).inc()
        self.e2e.labels(ep).observe(seconds)

    def render(self, kv: KVLayout, stats: EngineStats, unfinished: int, admitted: int, healthy: bool,
               prefill: dict | None = None) -> bytes:
        self.prefill.snapshot = prefill
        self.kv_layers.set(kv.layers)
        self.kv_plan.labels(layer_types=kv.layer_types, checkpoint_layer_types=kv.checkpoint_layer_types).set(1)
        self.kv_producers.set(kv.producing_layers)
        self.kv_bytes.set(kv.bytes_per_token)
        self.kv_full_bytes.set(kv.full_bytes_per_token)
        self.kv_sequence.set(kv.sequence_tokens or 0)
        if kv.capacity_tokens is not None:
            self.kv_capacity.set(kv.capacity_tokens)
            self.kv_used.set(round(stats.kv_usage * kv.capacity_tokens))
        self.kv_usage.set(stats.kv_usage)
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.unfinished.set(unfinished)
        self.admitted.set(admitted)
        self.engine_up.set(1 if healthy else 0)
        return generate_latest(self.registry)
