"""Offline engines: one in-process `vllm.LLM` per model, a KV budget applied by holding back blocks, and a runner
that adds a whole load at once and steps the engine as `LLM.generate()` does, timing every token.

KV budgets.  Every engine is built once with the same, largest KV allocation.  For a smaller budget of B bytes the
engine keeps exactly the blocks vLLM would have allocated for `kv_cache_memory_bytes=B`
(`B // bytes_per_block`, the null block included) and holds the others out of its block pool, so the scheduler
admits, grows and preempts as it would in an engine built with B.  `bytes_per_block` comes from the layer plan
(producers x 2 x KV heads x head size x dtype bytes x block size) and is checked against the block count vLLM
computed for the allocation.  One engine per model instead of one per (model, budget) keeps the start-ups (and
their compilation) out of the sweep, and lets the engines of every budget run back to back in alternating rounds.

Setting the budget, which precedes every load, also empties the prefix cache (`LLM.reset_prefix_cache`).  What
the runner reads from the engine besides the outputs (in-process engines only, VLLM_ENABLE_V1_MULTIPROCESSING=0):
the scheduler's requests, for their `num_preemptions`, and its block pool, for the budget.  The largest concurrency
is the most requests that received a token in one step.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_BYTES = 4  # fp32


def kv_bytes_per_block(model_dir: Path, block_size: int) -> int:
    """KV bytes of one block in `model_dir`'s engine: only the plan's producers keep KV (all layers for Llama)."""
    from lckv_vllm.plan import LayerPlan

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("model_type") == "llama":
        producers = layers
    else:
        producers = len(LayerPlan.parse(cfg.get("layer_types"), layers).producers)
    return producers * 2 * kv_heads * head_dim * DTYPE_BYTES * block_size


@dataclass
class RunResult:
    samples: list[dict]
    duration: float
    max_concurrency: int
    mean_concurrency: float
    preemptions: int
    steps: int


@dataclass
class OfflineEngine:
    name: str
    path: Path
    block_size: int
    alloc_bytes: int
    engine_kwargs: dict
    env: dict = field(default_factory=dict)
    llm: object = None
    total_blocks: int = 0
    bytes_per_block: int = 0
    startup_s: float = 0.0
    _held: list = field(default_factory=list)
    _counter: int = 0

    def start(self) -> None:
        from vllm import LLM

        from lckv_vllm.tools.env import temporary_env

        self.bytes_per_block = kv_bytes_per_block(self.path, self.block_size)
        t0 = time.perf_counter()
        with temporary_env(self.env):
            self.llm = LLM(str(self.path), kv_cache_memory_bytes=self.alloc_bytes, block_size=self.block_size,
                           **self.engine_kwargs)
        self.startup_s = time.perf_counter() - t0
        if not hasattr(self.llm.llm_engine.engine_core, "engine_core"):
            raise RuntimeError("the benchmark needs in-process engines: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                               "before vLLM is imported")
        self.total_blocks = self.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        expected = self.alloc_bytes // self.bytes_per_block
        if self.total_blocks != expected:
            raise RuntimeError(f"{self.name}: vLLM allocated {self.total_blocks} KV blocks for "
                               f"{self.alloc_bytes} bytes, the plan's {self.bytes_per_block} bytes per block give "
                               f"{expected}: budgets would be misapplied")

    # ---- the engine's internals the benchmark reads -------------------------------------------------------------
    @property
    def _scheduler(self):
        return self.llm.llm_engine.engine_core.engine_core.scheduler

    @property
    def attention(self) -> str:
        from lckv_vllm.tools.harness import model_of

        model = model_of(self.llm)
        path = getattr(getattr(model, "model", None), "path", None)
        return getattr(path, "name", None) or "vLLM default"

    # ---- budgets ------------------------------------------------------------------------------------------------
    def blocks_for(self, budget_bytes: int | None) -> int:
        """Blocks (null block included, as vLLM counts them) an engine built with `budget_bytes` would have."""
        if budget_bytes is None:
            return self.total_blocks
        return min(self.total_blocks, budget_bytes // self.bytes_per_block)

    def capacity_tokens(self, budget_bytes: int | None) -> int:
        return self.blocks_for(budget_bytes) * self.block_size

    def set_budget(self, budget_bytes: int | None) -> int:
        """Hold back the blocks beyond `budget_bytes` (None: the whole allocation).  Only between loads; it also
        empties the prefix cache (the identity engine runs the ceiling on the same prompts: no hits between runs)."""
        pool = self._scheduler.kv_cache_manager.block_pool
        if self._held:
            pool.free_blocks(self._held)
            self._held = []
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"{self.name}: the prefix cache could not be reset (blocks still in use)")
        keep = self.blocks_for(budget_bytes)
        if keep < self.total_blocks:
            self._held = pool.get_new_blocks(self.total_blocks - keep)
        return keep

    # ---- one load -----------------------------------------------------------------------------------------------
    def run(self, prompts: list[list[int]], output_len: int) -> RunResult:
        """Add every prompt at once, step until all finish; per-token times, concurrency and preemptions."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        sched = self._scheduler
        sp = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        samples: dict[str, dict] = {}
        t_start = time.perf_counter()
        for p in prompts:
            self._counter += 1
            rid = f"{self.name}-{self._counter}"
            samples[rid] = {"arrival": time.perf_counter(), "tokens": [], "end": None, "output_tokens": 0,
                            "prompt_tokens": len(p)}
            engine.add_request(rid, TokensPrompt(prompt_token_ids=p), sp)
        preempted: dict[str, int] = {}
        max_conc = steps = 0
        token_steps = 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            produced = 0
            for o in outs:
                s = samples.get(o.request_id)
                if s is None:
                    continue
                n = len(o.outputs[0].token_ids) if o.outputs else 0
                if n:
                    s["tokens"].append(now)
                    s["output_tokens"] += n
                    produced += 1
                if o.finished:
                    s["end"] = now
            for rid, req in sched.requests.items():
                if req.num_preemptions:
                    preempted[rid] = max(preempted.get(rid, 0), req.num_preemptions)
            if produced:
                steps += 1
                token_steps += produced
                max_conc = max(max_conc, produced)
        duration = time.perf_counter() - t_start
        done = [s for s in samples.values() if s["end"] is not None]
        return RunResult(samples=done, duration=duration, max_concurrency=max_conc,
                         mean_concurrency=token_steps / steps if steps else 0.0,
                         preemptions=sum(preempted.values()), steps=steps)

    def close(self) -> None:
        if self.llm is None:
            return
        try:
            self.set_budget(None)
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the process is about to drop the engine anyway
            pass
        self.llm = None
        gc.collect()
