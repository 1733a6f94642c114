"""`lckv-vllm bench`: throughput at equal KV memory, in a paged, continuously batching engine.

One run measures, on models of one shape with different cross-layer plans (identity, LCKV w2, the released w10
layout with force_nodiag, sandwich-middle, CLA-2) and vLLM's own LlamaForCausalLM on the identity weights:

  offline  every request of a load added at once to an in-process engine, stepped as LLM.generate() does, at a
           sweep of KV budgets (in units of "full sequences of the paper-regime workload that vLLM's Llama fits",
           from 2 up to a budget where nothing is memory-bound), for two workloads: the paper's regime (short
           prompts, long generations, ignore_eos) and a prompt-heavier one; plus the ceiling: the identity plan with
           the whole KV allocation (memory never limits) on the same load, run next to the engines of every budget.
           All engines live in one process; rounds alternate the order; ratios are medians of per-round ratios.
  prefill  TTFT of one prompt of each length for each plan against identity, next to the analytic ratio
           (cyclic layers x passes + other layers) / layers, and where LCKV stops paying off (prompt/output ratio).
  served   lckv-serve per model at the target budget (and the ceiling without limit), requests arriving at a fixed
           rate (locust, one open-loop user), so new prompts join steps full of running decodes.

Per point: KV capacity (tokens), the largest concurrency reached, preemptions, output tokens/s, TTFT/TPOT/ITL/E2EL
mean, p50, p99, and every ratio against identity, vLLM's Llama and the ceiling.  Writes bench.json, bench.md (the
markdown tables, also printed) and bench_batch.png (throughput vs batch size, as the paper's Figure 4),
bench_budget.png (vs KV budget), bench_prefill.png, bench_served.png into --out.

The full default run takes about 12-15 minutes on an idle 2-core CPU (more on a shared one); --quick about 5.
Sizes: --paper/--heavy PROMPT:OUTPUT, --requests, --budgets, --rounds/--target-rounds, --prefill-lens; --shape tiny
for a smoke run of seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLANS = ("identity", "w2", "w10", "sandwich", "cla")
SHAPES = {
    "bench22": "22 layers (as TinyLlama), hidden 256, 8 query / 2 KV heads of 32, intermediate 512, vocab 32000",
    "tiny": "6 layers, hidden 128, 4 query / 2 KV heads of 32, intermediate 256, vocab 32000",
}
QUICK = dict(paper="16:64", heavy="64:16", requests=8, budgets="2,4", target_budget=4, rounds=1, target_rounds=2,
             prefill_lens="64,256,1024", prefill_reps=1, served_models="llama,w2,ceiling", served_requests=8)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_len: int
    output_len: int
    requests: int

    def blocks_per_seq(self, block_size: int) -> int:
        return math.ceil((self.prompt_len + self.output_len) / block_size)

    def as_dict(self) -> dict:
        return {"name": self.name, "prompt_len": self.prompt_len, "output_len": self.output_len,
                "requests": self.requests}


def _lengths(text: str, flag: str) -> tuple[int, int]:
    try:
        p, o = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"lckv-vllm bench: {flag} wants PROMPT:OUTPUT tokens, e.g. 16:128; got {text!r}")
    if p < 1 or o < 1:
        raise SystemExit(f"lckv-vllm bench: {flag}: lengths must be >= 1")
    return p, o


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"lckv-vllm bench: {flag} wants comma-separated integers; got {text!r}")
    if not vals or min(vals) < 1:
        raise SystemExit(f"lckv-vllm bench: {flag}: give positive integers")
    return vals


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise SystemExit(f"lckv-vllm bench: {flag}: unknown {', '.join(bad)}; known: {', '.join(allowed)}")
    return list(dict.fromkeys(vals))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lckv-vllm bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("models")
    g.add_argument("--shape", choices=tuple(SHAPES), default="bench22",
                   help="model shape: bench22 = %s; tiny = %s (default: %%(default)s)" % (SHAPES["bench22"],
                                                                                          SHAPES["tiny"]))
    g.add_argument("--plans", default=",".join(PLANS),
                   help="plans to compare (identity is always included; vLLM's Llama runs on its weights) "
                        "(default: %(default)s)")
    g.add_argument("--compiled", action="store_true",
                   help="use vLLM's torch.compile (adds ~30-60 s per engine and server); default: eager")
    g = ap.add_argument_group("load")
    g.add_argument("--paper", default="16:128", metavar="P:O",
                   help="paper-regime workload: prompt and output tokens (default: %(default)s)")
    g.add_argument("--heavy", default="64:16", metavar="P:O",
                   help="prompt-heavier workload (default: %(default)s); 'none' to skip it")
    g.add_argument("--requests", type=int, default=16, help="requests per offline load (default: %(default)s)")
    g.add_argument("--budgets", default="2,4,10",
                   help="KV budgets, in full paper-regime sequences that vLLM's Llama fits; a budget where "
                        "nothing is memory-bound is always added (default: %(default)s)")
    g.add_argument("--target-budget", type=int, default=10,
                   help="the budget of the targets and of the served runs (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=1,
                   help="offline rounds at every budget, alternating order (default: %(default)s)")
    g.add_argument("--target-rounds", type=int, default=3,
                   help="offline rounds at the target budget (paired ratios for the targets) (default: %(default)s)")
    g.add_argument("--block-size", type=int, default=32,
                   help="KV block size; vLLM's CPU attention (the Llama baseline) wants a multiple of 32 "
                        "(default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=256,
                   help="scheduler cap, high enough that memory, not the cap, limits (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("prefill")
    g.add_argument("--prefill-lens", default="64,256,1024,2048",
                   help="prompt lengths of the TTFT comparison (default: %(default)s)")
    g.add_argument("--prefill-reps", type=int, default=2, help="(default: %(default)s)")
    g = ap.add_argument_group("served")
    g.add_argument("--no-served", action="store_true", help="skip the served part")
    g.add_argument("--no-offline", action="store_true", help="skip the offline sweep and the prefill part")
    g.add_argument("--served-models", default="llama,identity,w2,ceiling",
                   help="models to serve at the target budget; 'ceiling' = identity without KV limit "
                        "(default: %(default)s)")
    g.add_argument("--served-workloads", default="paper,heavy", help="(default: %(default)s)")
    g.add_argument("--served-requests", type=int, default=16, help="requests per served load (default: %(default)s)")
    g.add_argument("--rate", type=float, default=3.0,
                   help="arrivals per second, at fixed intervals (default: %(default)s)")
    g.add_argument("--served-rounds", type=int, default=1, help="(default: %(default)s)")
    g = ap.add_argument_group("output")
    g.add_argument("--quick", action="store_true",
                   help="smaller everything: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    g.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="directory for bench.json, bench.md, bench_*.png (default: benchmarks/results)")
    g.add_argument("--workdir", default=str(REPO / "models" / "bench"),
                   help="where the checkpoints and server logs go (default: models/bench)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _machine() -> dict:
    from lckv_vllm.tools.harness import machine

    return machine()


def _prompts(seed: int, tag: str, n: int, length: int) -> list[list[int]]:
    rnd = random.Random(f"{seed}/{tag}")  # fresh prompts per cell: prefix caching never hits
    return [[rnd.randrange(3, 32000) for _ in range(length)] for _ in range(n)]


def _plan_facts(path: Path) -> dict:
    from lckv_vllm.plan import plan_from_config

    cfg = json.loads((path / "config.json").read_text())
    plan = plan_from_config(argparse.Namespace(**cfg))
    return {"layer_types": plan.layer_types, "force_nodiag": plan.force_nodiag, "producers": len(plan.producers),
            "layers": plan.num_layers, "cyclic_layers": sum(len(s.layers) for s in plan.segments if s.cyclic),
            "passes": plan.num_passes}


def analytic_ratio(facts: dict, prompt_len: int, economy: bool) -> float:
    """Prefill cost relative to identity: (cyclic layers x passes + other layers) / layers.  With the pass
    economy, pass k runs over the prompt's tokens from index k-1 on only: sum over passes of (L-k+1)/L."""
    cyc, layers = facts["cyclic_layers"], facts["layers"]
    passes = max(1, min(facts["passes"], prompt_len)) if cyc else 1
    work = sum((prompt_len - k) / prompt_len for k in range(passes)) if economy else passes
    return (cyc * work + (layers - cyc)) / layers


class Progress:
    def __init__(self, total: int, disable: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="bench", unit="step", dynamic_ncols=True, disable=disable,
                        file=sys.stderr)

    def step(self, what: str, n: int = 1) -> None:
        self.bar.set_postfix_str(what[:60])
        self.bar.update(n)

    def note(self, what: str) -> None:
        self.bar.set_postfix_str(what[:60])

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    given = {a.split("=", 1)[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    explicit = {a.dest for a in ap._actions if given.intersection(a.option_strings)}
    if args.quick:
        for k, v in QUICK.items():
            if k not in explicit:
                setattr(args, k, v)
    # in-process engines (the runner reads the scheduler), quiet logs, before vLLM is imported
    from lckv_vllm.tools.harness import script_env

    script_env(force_in_process=True)

    plans = _names(args.plans, PLANS, "--plans")
    if "identity" not in plans:
        plans.insert(0, "identity")
    paper = Workload("paper", *_lengths(args.paper, "--paper"), args.requests)
    workloads = [paper]
    if args.heavy != "none":
        workloads.append(Workload("prompt-heavy", *_lengths(args.heavy, "--heavy"), args.requests))
    budgets_k = sorted(set(_ints(args.budgets, "--budgets")))
    if args.target_budget not in budgets_k:
        raise SystemExit(f"lckv-vllm bench: --target-budget {args.target_budget} is not among --budgets "
                         f"{','.join(map(str, budgets_k))}")
    prefill_lens = sorted(set(_ints(args.prefill_lens, "--prefill-lens")))
    served_models = _names(args.served_models, ("llama",) + PLANS + ("ceiling",), "--served-models")
    served_models = [m for m in served_models if m in ("llama", "ceiling") or m in plans]
    served_wl = _names(args.served_workloads, ("paper", "heavy"), "--served-workloads")
    served_wl = [w for w in workloads if (w.name == "paper" and "paper" in served_wl)
                 or (w.name == "prompt-heavy" and "heavy" in served_wl)]
    if min(args.rounds, args.target_rounds, args.prefill_reps, args.served_rounds, args.requests,
           args.served_requests) < 1:
        raise SystemExit("lckv-vllm bench: --rounds, --target-rounds, --prefill-reps, --served-rounds, --requests, "
                         "--served-requests must be >= 1")
    bs = args.block_size
    # a served workload whose sequence vLLM's Llama cannot hold at the target budget is left out (noted)
    target_blocks = args.target_budget * paper.blocks_per_seq(bs)
    served_skipped = [w.name for w in served_wl if target_blocks // w.blocks_per_seq(bs) < 1]
    served_wl = [w for w in served_wl if w.name not in served_skipped]
    do_offline, do_served = not args.no_offline, not args.no_served and bool(served_models) and bool(served_wl)

    from lckv_vllm.tools.checkpoint import export_llama, make_preset

    from .offline import OfflineEngine, kv_bytes_per_block

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- sizes: budgets in bytes, the allocation every engine gets, max_model_len ------------------------------
    max_model_len = max([w.prompt_len + w.output_len for w in workloads] + [n + 1 for n in prefill_lens])
    max_model_len = math.ceil(max_model_len / bs) * bs
    max_num_seqs = max(args.max_num_seqs, args.requests, args.served_requests)
    # a whole prompt fits one step (cyclic plans need it; the same token budget for every engine)
    batched_tokens = max(max_model_len, max_num_seqs)
    n_engines = 1 + len(plans)
    served_loads = len(served_models) * len(served_wl) * args.served_rounds if do_served else 0
    n_points = len(budgets_k) + 1
    extra = max(0, args.target_rounds - args.rounds) * len(workloads) * (n_engines + 1)
    offline_runs = (args.rounds * len(workloads) * (n_points * n_engines + len(budgets_k)) + extra) if do_offline else 0
    prefill_runs = args.prefill_reps * len(prefill_lens) * n_engines if do_offline else 0
    progress = Progress(1 + (n_engines if do_offline else 0) + offline_runs + prefill_runs
                        + (len(served_models) if do_served else 0) + served_loads, args.no_progress)

    progress.note("writing checkpoints")
    paths: dict[str, Path] = {}
    for plan in plans:
        paths[plan] = make_preset(f"{args.shape}-{plan}", work / f"{args.shape}-{plan}", seed=args.seed)
    paths["llama"] = export_llama(paths["identity"], work / f"{args.shape}-llama")
    engine_names = ["llama"] + plans
    progress.step("checkpoints written")

    llama_bpb = kv_bytes_per_block(paths["llama"], bs)
    max_bps = max(w.blocks_per_seq(bs) for w in workloads)
    alloc_blocks = max(max(w.requests for w in workloads + served_wl) * max_bps + 1, max_model_len // bs + 2,
                       max(budgets_k) * paper.blocks_per_seq(bs) + 1)
    if do_served:
        alloc_blocks = max(alloc_blocks, args.served_requests * max_bps + 1)
    alloc_bytes = alloc_blocks * llama_bpb
    budgets = [{"label": f"{k} seq", "llama_sequences": k, "bytes": (k * paper.blocks_per_seq(bs) + 1) * llama_bpb}
               for k in budgets_k]
    budgets.append({"label": "no limit", "llama_sequences": None, "bytes": alloc_bytes})
    target = next(b for b in budgets if b["llama_sequences"] == args.target_budget)

    facts = {name: _plan_facts(paths[name]) for name in plans}
    economy = os.environ.get("LCKV_PASS_ECONOMY", "1").strip().lower() not in ("0", "false", "no", "off")
    report: dict = {
        "benchmark": "throughput at equal KV memory (lckv-vllm bench)",
        "command": "lckv-vllm bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
        "settings": {
            "dtype": "float32", "block_size": bs, "compiled": args.compiled, "max_num_seqs": max_num_seqs,
            "max_model_len": max_model_len, "max_num_batched_tokens": batched_tokens, "seed": args.seed,
            "shape": args.shape, "model": SHAPES[args.shape], "plans": facts, "rounds": args.rounds,
            "target_rounds": max(args.rounds, args.target_rounds),
            "workloads": [w.as_dict() for w in workloads], "budgets": budgets,
            "kv_allocation_bytes": alloc_bytes, "llama_kv_bytes_per_block": llama_bpb,
            "target_budget": target["label"], "prefill_lengths": prefill_lens, "prefill_reps": args.prefill_reps,
            "pass_economy": economy,
            "budget_method": "every engine allocates kv_allocation_bytes once; a budget of B bytes keeps the "
                             "B // bytes_per_block blocks vLLM would allocate for kv_cache_memory_bytes=B and "
                             "holds the rest out of the block pool",
            "definitions": {
                "kv_capacity_tokens": "blocks x block size, the null block included, as vLLM reports it",
                "fits_sequences": "full sequences (prompt + output) of the workload the usable blocks hold",
                "max_concurrency": "offline: most requests that received a token in one engine step; served: most "
                                   "running requests in one step (SchedulerStats.num_running_reqs)",
                "mean_concurrency": "offline: output tokens per engine step that produced any",
                "preemptions": "offline: sum of the scheduler's per-request num_preemptions; served: sum of "
                               "IterationStats.num_preempted_reqs",
                "latencies": "TTFT from the request's arrival (offline: all arrive at once, so TTFT includes "
                             "queueing), TPOT = (E2EL - TTFT) / (output tokens - 1), ITL = gaps between deliveries",
                "ratios": "vs_X[field] = median over rounds of (this engine / X) for that field, X run in the same "
                          "round at the same point; the ceiling is identity with the whole allocation",
            },
        },
    }
    engine_kwargs = dict(dtype="float32", max_model_len=max_model_len, max_num_batched_tokens=batched_tokens,
                         seed=args.seed, max_num_seqs=max_num_seqs, enforce_eager=not args.compiled)
    t_begin = time.perf_counter()
    if do_offline:
        engines: dict[str, OfflineEngine] = {}
        try:
            for name in engine_names:
                progress.note(f"starting {name}")
                e = OfflineEngine(name, paths[name], bs, alloc_bytes, engine_kwargs)
                e.start()
                # warm-up: a few decodes and one prefill, so that first-call costs stay out of the measurements
                e.run(_prompts(args.seed, f"warm/{name}", 2, 8), 4)
                e.run(_prompts(args.seed, f"warm-prefill/{name}", 1, min(256, max(prefill_lens))), 1)
                engines[name] = e
                progress.step(f"started {name} ({e.startup_s:.0f} s)")
            report["settings"]["engines"] = {
                n: {"startup_s": e.startup_s, "attention": e.attention, "kv_bytes_per_block": e.bytes_per_block,
                    "kv_allocated_blocks": e.total_blocks} for n, e in engines.items()}
            report["offline"] = _offline(engines, workloads, budgets, target["label"], args, bs, progress)
            report["prefill"] = _prefill(engines, facts, prefill_lens, economy, args, progress)
        finally:
            for e in engines.values():
                e.close()
        report["prefill"]["break_even"] = _break_even(report, target, workloads)
    if do_served:
        report["settings"]["served_skipped"] = served_skipped
        # servers see the served workloads only: vLLM refuses a max_model_len its KV budget cannot hold
        served_len = math.ceil(max([w.prompt_len + w.output_len for w in served_wl] + [bs]) / bs) * bs
        opts = {"block_size": bs, "max_num_seqs": max_num_seqs, "max_model_len": served_len,
                "max_num_batched_tokens": max(served_len, max_num_seqs), "seed": args.seed,
                "compiled": args.compiled}
        report["settings"]["served_server_options"] = opts
        report["served"] = _served(paths, served_models, served_wl, target, alloc_bytes, args, bs, opts, work,
                                   progress)
    report["targets"] = _targets(report, target, budgets)
    report["elapsed_s"] = time.perf_counter() - t_begin
    progress.close()

    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    from .report import markdown, plots

    md = markdown(report)
    (out / "bench.md").write_text(md + "\n")
    written = plots(report, out)
    print(md)
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, " + ", ".join(str(p) for p in written)
          + f" in {report['elapsed_s']:.0f} s")
    return 0


def _engine_point(e, budget: dict, workload: Workload, run, bs: int) -> dict:
    from .metrics import summarize

    blocks = e.blocks_for(budget["bytes"])
    res = summarize(run.samples, run.duration)
    res.update(kv_budget_bytes=budget["bytes"], kv_blocks=blocks,
               kv_capacity_tokens=blocks * bs, fits_sequences=(blocks - 1) // workload.blocks_per_seq(bs),
               max_concurrency=run.max_concurrency, mean_concurrency=run.mean_concurrency,
               preemptions=run.preemptions)
    return res


def _offline(engines: dict, workloads: list[Workload], budgets: list[dict], target_label: str, args, bs: int,
             progress) -> dict:
    from .report import add_ratios, aggregate

    names = list(engines)
    llama = engines["llama"]
    per: dict = {}  # (workload, budget label) -> engine -> list of rounds
    skipped: dict = {}
    for r in range(max(args.rounds, args.target_rounds)):
        for w in workloads:
            for b in budgets:
                if r >= (max(args.rounds, args.target_rounds) if b["label"] == target_label else args.rounds):
                    continue
                key = (w.name, b["label"])
                if (llama.blocks_for(b["bytes"]) - 1) // w.blocks_per_seq(bs) < 1:
                    skipped[key] = "vLLM's Llama cannot hold one sequence of this workload"
                    progress.step(f"skip {w.name} {b['label']}", len(names) + (b["llama_sequences"] is not None))
                    continue
                prompts = _prompts(args.seed, f"offline/{r}/{w.name}/{b['label']}", w.requests, w.prompt_len)
                order = [(n, b) for n in names]
                if b["llama_sequences"] is not None:
                    order.append(("ceiling", budgets[-1]))  # identity with the whole allocation
                for name, budget in (order if r % 2 == 0 else order[::-1]):
                    e = engines["identity" if name == "ceiling" else name]
                    progress.note(f"r{r} {w.name} {b['label']} {name}")
                    e.set_budget(budget["bytes"])
                    run = e.run(prompts, w.output_len)
                    per.setdefault(key, {}).setdefault(name, []).append(_engine_point(e, budget, w, run, bs))
                    progress.step(f"r{r} {w.name} {b['label']} {name}")
    result = {}
    for w in workloads:
        points = []
        for b in budgets:
            key = (w.name, b["label"])
            if key in skipped:
                points.append({"label": b["label"], "llama_sequences": b["llama_sequences"],
                               "kv_budget_bytes": b["bytes"], "skipped": skipped[key], "engines": {}})
                continue
            eng = {name: aggregate(rounds) for name, rounds in per[key].items()}
            if "ceiling" not in eng:  # the no-limit point: identity has the whole allocation, it is the ceiling
                eng["ceiling"] = aggregate([dict(x) for x in per[key]["identity"]])
            add_ratios(eng)
            points.append({"label": b["label"], "llama_sequences": b["llama_sequences"],
                           "kv_budget_bytes": b["bytes"],
                           "llama_fits_sequences": eng["llama"]["fits_sequences"], "engines": eng})
        result[w.name] = {"workload": w.as_dict(), "points": points}
    return result


def _prefill(engines: dict, facts: dict, lens: list[int], economy: bool, args, progress) -> dict:
    from .metrics import median, ratio

    names = list(engines)
    ttft: dict = {n: {L: [] for L in lens} for n in names}
    for rep in range(args.prefill_reps):
        for L in lens:
            prompt = _prompts(args.seed, f"prefill/{rep}/{L}", 1, L)
            for name in (names if rep % 2 == 0 else names[::-1]):
                e = engines[name]
                e.set_budget(None)
                run = e.run(prompt, 1)
                s = run.samples[0]
                ttft[name][L].append((s["tokens"][0] - s["arrival"]) * 1000)
                progress.step(f"prefill {L} {name}")
    plans = {}
    for name in names:
        r = {"ttft_ms": {str(L): median(ttft[name][L]) for L in lens},
             "ttft_ms_reps": {str(L): ttft[name][L] for L in lens},
             "ratio_vs_identity": {str(L): median([ratio(a, b) for a, b in zip(ttft[name][L], ttft["identity"][L])])
                                   for L in lens},
             "ratio_vs_llama": {str(L): median([ratio(a, b) for a, b in zip(ttft[name][L], ttft["llama"][L])])
                                for L in lens}}
        f = facts.get(name, facts["identity"])  # vLLM's Llama: the identity plan
        r["analytic_ratio"] = {str(L): analytic_ratio(f, L, False) for L in lens}
        r["analytic_ratio_pass_economy"] = {str(L): analytic_ratio(f, L, True) for L in lens}
        plans[name] = r
    return {"lengths": lens, "reps": args.prefill_reps, "pass_economy": economy, "plans": plans}


def _break_even(report: dict, target: dict, workloads: list[Workload]) -> dict | None:
    """Prompt tokens per output token above which a plan's throughput falls below vLLM's Llama at the target
    budget.  Per output token a request costs s (seconds, decode at the batch the budget allows: 1 / the paper
    workload's output tokens/s) plus (prompt/output) x a x r (a: identity's prefill seconds per prompt token, r:
    the plan's prefill cost relative to identity, both at the prefill length nearest the heavy prompt).  The plan
    wins while s_plan + x a r_plan < s_llama + x a r_llama: x* = (s_llama - s_plan) / (a (r_plan - r_llama))."""
    off = report.get("offline", {}).get("paper")
    pf = report.get("prefill")
    if not off or not pf:
        return None
    point = next((p for p in off["points"] if p["label"] == target["label"] and p["engines"]), None)
    if point is None:
        return None
    heavy = next((w for w in workloads if w.name == "prompt-heavy"), None)
    want = heavy.prompt_len if heavy else max(pf["lengths"])
    L = str(min(pf["lengths"], key=lambda n: abs(math.log(n / want))))
    ident = pf["plans"]["identity"]["ttft_ms"][L]
    a = ident / 1000 / int(L)
    if not point["engines"]["llama"]["output_throughput"] or not ident:
        return None
    s_llama = 1 / point["engines"]["llama"]["output_throughput"]
    r_llama = pf["plans"]["llama"]["ratio_vs_identity"][L] or 1.0
    res = {}
    for name in pf["plans"]:
        if name in ("identity", "llama") or name not in point["engines"]:
            continue
        if not point["engines"][name]["output_throughput"]:
            continue
        s_plan = 1 / point["engines"][name]["output_throughput"]
        r_plan = pf["plans"][name]["ratio_vs_identity"][L]
        entry = {"decode_s_per_token": s_plan, "llama_decode_s_per_token": s_llama, "prefill_ratio": r_plan,
                 "llama_prefill_ratio": r_llama, "identity_prefill_s_per_token": a}
        if s_plan >= s_llama:
            entry.update(prompt_per_output=0.0, note="no gain at this budget even without prompts")
        elif r_plan is None or r_plan <= r_llama:
            entry.update(prompt_per_output=None, note="prefill no dearer than Llama's: always ahead")
        else:
            entry["prompt_per_output"] = (s_llama - s_plan) / (a * (r_plan - r_llama))
        res[name] = entry
    measured = {}
    if heavy:
        hp = next((p for p in report["offline"]["prompt-heavy"]["points"] if p["label"] == target["label"]), None)
        if hp and hp["engines"]:
            measured = {n: r["vs_llama"]["output_throughput"] for n, r in hp["engines"].items() if r.get("vs_llama")}
    return {"budget_label": target["label"], "reference_prompt_len": int(L), "plans": res,
            "measured_prompt_heavy_vs_llama": measured,
            "method": "estimate from the paper-regime throughputs and the prefill TTFTs; see _break_even"}


def _served(paths: dict, models: list[str], workloads: list[Workload], target: dict, alloc_bytes: int, args,
            bs: int, opts: dict, work: Path, progress) -> dict:
    from . import served
    from .metrics import summarize
    from .report import add_ratios, aggregate

    logs = work / "served-logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers: dict = {}
    per: dict = {}
    try:
        progress.note(f"starting {len(models)} servers")
        for name in models:
            path = paths["identity" if name == "ceiling" else name]
            budget = alloc_bytes if name == "ceiling" else target["bytes"]
            servers[name] = served.launch(name, path, budget, opts, logs)
        for name in models:
            served.wait_ready(servers[name])
            progress.step(f"serving {name} ({servers[name].startup_s:.0f} s)")
        for r in range(args.served_rounds):
            for w in workloads:
                prompts = _prompts(args.seed, f"served/{r}/{w.name}", args.served_requests, w.prompt_len)
                for name in (models if r % 2 == 0 else models[::-1]):
                    srv = servers[name]
                    progress.note(f"served r{r} {w.name} {name}")
                    load = served.run_load(srv, prompts, w.output_len, args.rate, logs, f"{r}-{w.name}")
                    res = summarize(load["samples"], load["duration"], failed=len(load["failures"]))
                    budget = alloc_bytes if name == "ceiling" else target["bytes"]
                    cap = srv.capacity_tokens
                    blocks = cap // bs if cap else None
                    res.update(kv_budget_bytes=budget, kv_capacity_tokens=cap, kv_blocks=blocks,
                               fits_sequences=(blocks - 1) // w.blocks_per_seq(bs) if blocks else None,
                               max_concurrency=load["max_concurrency"], mean_concurrency=None,
                               preemptions=load["preemptions"], failures=load["failures"][:5])
                    per.setdefault(w.name, {}).setdefault(name, []).append(res)
                    progress.step(f"served r{r} {w.name} {name}")
    finally:
        for srv in servers.values():
            srv.stop()
    result = {}
    for w in workloads:
        eng = {name: aggregate(rounds) for name, rounds in per[w.name].items()}
        add_ratios(eng)
        result[w.name] = {"workload": {**w.as_dict(), "requests": args.served_requests}, "models": eng}
    return {"budget_label": target["label"], "budget_bytes": target["bytes"], "rate_per_s": args.rate,
            "arrivals": "fixed intervals (1/rate), one open-loop locust user", "requests": args.served_requests,
            "rounds": args.served_rounds, "server": "lckv-serve (benchmarks/bench/serve_probe.py)",
            "startup_s": {n: s.startup_s for n, s in servers.items()}, "workloads": result}


def _targets(report: dict, target: dict, budgets: list[dict]) -> dict:
    """The throughput and latency targets of the benchmark (docs/performance.md), reported (not asserted)."""
    values, goals = {}, {}
    off = report.get("offline", {}).get("paper")
    llama_fits = None
    if off:
        p = next((p for p in off["points"] if p["label"] == target["label"]), None)
        if p and "w2" in p["engines"]:
            w2 = p["engines"]["w2"]
            llama_fits = p["llama_fits_sequences"]
            values["offline w2 / ceiling output tok/s"] = w2["vs_ceiling"]["output_throughput"]
            goals["offline w2 / ceiling output tok/s"] = ">= 0.9"
            values["offline w2 / vLLM Llama output tok/s"] = w2["vs_llama"]["output_throughput"]
    sv = report.get("served", {}).get("workloads", {}).get("paper")
    if sv and "w2" in sv["models"]:
        w2 = sv["models"]["w2"]
        if w2.get("vs_ceiling"):
            values["served w2 / ceiling mean TPOT"] = w2["vs_ceiling"]["mean_tpot_ms"]
            goals["served w2 / ceiling mean TPOT"] = "<= 1.2"
        if w2.get("vs_llama"):
            values["served w2 / vLLM Llama output tok/s"] = w2["vs_llama"]["output_throughput"]
    met = {}
    for k, goal in goals.items():
        v = values.get(k)
        met[k] = None if v is None else (v >= 0.9 if goal.startswith(">=") else v <= 1.2)
    return {"budget_label": target["label"], "llama_fits": llama_fits if llama_fits is not None
            else target["llama_sequences"], "values": values, "goals": goals, "met": met}


if __name__ == "__main__":
    sys.exit(main())
