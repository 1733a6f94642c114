"""StreamingLLM decode on the torch path: the one-frame read against the doubled-head read, in the same engine.

The streaming read (lckv_vllm/engine/attention/streaming_read.py) scores sinks and window keys in two rotary frames.
Where every query's shift equals its sequence's (every decode step) one head of the model's size carries both
scores (`one_frame`); otherwise it doubles the head.  This script measures what the one-frame case saves: one
engine per model (the committed trained 6-layer Shakespeare models, 4 sinks + window 252, fp32, eager), one
request streaming past the window, and alternating rounds of decode steps with the one-frame case allowed (new) and
forced off (old: the doubled head on every step), so both see the same machine and contexts.
Reported: median step time per variant and the median (min, max) of per-round ratios old / new.

    .venv/bin/python -m benchmarks.streaming_read   -> benchmarks/results/streaming_read.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, script_env, write_results

script_env(force_in_process=True)

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"identity": ROOT / "examples" / "shakespeare-identity", "lckv-w2": ROOT / "examples" / "shakespeare-lckv-w2"}
STREAMING = {"sink_tokens": 4, "window": 252}


def measure(path: Path, rounds: int, steps: int, warm: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lckv_vllm.engine.attention import streaming_read as st

    force_doubled = {"on": False}
    original = st._StreamIndex.__init__

    def index(self, *args, **kwargs):  # "old": the doubled head, never one frame
        original(self, *args, **kwargs)
        if force_doubled["on"]:
            self.one_frame = self.dense = False

    st._StreamIndex.__init__ = index
    try:
        llm = LLM(str(path), dtype="float32", block_size=16, enforce_eager=True, seed=0, max_model_len=4096,
                  kv_cache_memory_bytes=64 << 20, hf_overrides={"lckv_streaming": STREAMING})
        eng = llm.llm_engine
        total = warm + 2 * rounds * steps
        eng.add_request("s", TokensPrompt(prompt_token_ids=list(range(5, 69))),
                        SamplingParams(max_tokens=total + 8, temperature=0, ignore_eos=True))
        for _ in range(warm):  # past sinks + window: every later step reads 256 keys
            eng.step()
        ms = {"new": [], "old": []}
        for r in range(rounds):
            for variant in (("old", "new") if r % 2 == 0 else ("new", "old")):
                force_doubled["on"] = variant == "old"
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    eng.step()
                    times.append(time.perf_counter() - t0)
                ms[variant].append(statistics.median(times) * 1000)
        del llm, eng
    finally:
        st._StreamIndex.__init__ = original
    ratios = [o / n for o, n in zip(ms["old"], ms["new"])]
    return {"median_ms_per_step": {k: round(statistics.median(v), 3) for k, v in ms.items()},
            "old_over_new": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                             "max": round(max(ratios), 3)},
            "rounds_ms": {k: [round(x, 3) for x in v] for k, v in ms.items()},
            "context_tokens": [64 + warm, 64 + warm + 2 * rounds * steps]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=120, help="decode steps per round and variant")
    ap.add_argument("--warm", type=int, default=300)
    args = ap.parse_args(argv)
    from lckv_vllm.tools.harness import machine

    out = {"command": command_line("benchmarks.streaming_read", argv), "machine": machine(),
           "streaming": STREAMING, "args": vars(args), "models": {}}
    for name, path in MODELS.items():
        out["models"][name] = r = measure(path, args.rounds, args.steps, args.warm)
        print(f"{name}: {r['median_ms_per_step']} old/new {r['old_over_new']}", flush=True)
    res = ROOT / "benchmarks" / "results" / "streaming_read.json"
    write_results(res, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
