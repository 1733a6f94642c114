"""LCKV's prefill tax on trained deep models: fixed m+b passes against adaptive passes, chunked prefill and prefix
caching, next to identity and vLLM's own Llama on the identity twin's weights.

Models (benchmarks/train_deep.py): LCKV w2 with a 10-layer cyclic segment and its identity twin, 12 layers, hidden
256, trained on Shakespeare; vLLM's LlamaForCausalLM runs the identity twin's weights (`export_llama`).  Every
prompt is held-out Shakespeare text (random token ids would say nothing about convergence).  Engines:

  llama       vLLM's Llama (prefix caching and chunked prefill as vLLM configures them)
  identity    the plugin, identity plan (plain Llama computation)
  lckv-fixed  LCKV w2 as served before adaptive passes: whole-prompt prefill, always m+b passes
              (`LCKV_CHUNKED_PREFILL=0 LCKV_PREFILL_TOL=0`)
  lckv        LCKV w2 under the defaults: adaptive passes, chunked prefill, prefix caching

  prefill  TTFT of one prompt of 64-2048 tokens (offline, in-process, prefix cache emptied before each), and the
           passes the LCKV engines used; ratios to identity measured in the same round.
  loads    the paper load (16 + 128 tokens) and the prompt-heavy load (64 + 16), 16 requests added at once, at KV
           budgets of 2 / 4 / 10 paper-load sequences of vLLM's Llama and without limit (as `lckv-vllm bench`);
           output tokens/s and ratios to vLLM's Llama, medians of per-round ratios over alternating rounds.
  blocks   TTFT of one prompt of 256-2048 tokens under each prefill block size (`LCKV_PREFILL_BLOCK` 0 = the
           chunk as one block, 64, 128, 256 = default, 512), with the rows the cyclic segment recomputed per prompt
           token; ratios to identity measured in the same round.
  chat     lckv-serve per engine, a multi-turn chat load with locust (loadtests/chat_locustfile.py): conversations
           sharing a ~1,200-character system prompt, 4 turns each, 4 at once; TTFT per turn, prefix-cache hit rate
           (usage.prompt_tokens_details.cached_tokens), TPOT.

    .venv/bin/python -m benchmarks.prefill_tax [--quick]   -> benchmarks/results/prefill_tax.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, model_of, pyplot, save_figure, script_env, write_results

script_env(force_in_process=True)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEEP = ROOT / "models" / "deep"
BLOCK = 32  # vLLM's CPU attention (the Llama baseline) wants a multiple of 32
FIXED_ENV = {"LCKV_CHUNKED_PREFILL": "0", "LCKV_PREFILL_TOL": "0"}
ENGINES = ("llama", "identity", "lckv-fixed", "lckv")
# conversation text indices: the main chat load takes 0..conversations-1, the light load LIGHT_FIRST on, the
# warm-up conversation WARM_FIRST (none of them seen by the server before it is measured)
LIGHT_FIRST, WARM_FIRST = 100, 200


def engine_specs() -> dict:
    from lckv_vllm.tools.checkpoint import export_llama

    llama = DEEP / "llama"
    if not (llama / "config.json").exists():
        export_llama(DEEP / "identity", llama)
    return {"llama": (llama, {}), "identity": (DEEP / "identity", {}), "lckv-fixed": (DEEP / "lckv-w2", FIXED_ENV),
            "lckv": (DEEP / "lckv-w2", {})}


class Text:
    """Held-out Shakespeare in the models' tokenizer, handed out in fresh, non-overlapping pieces."""

    def __init__(self, path: Path, model: Path):
        from transformers import AutoTokenizer

        from lckv_vllm import register

        register()
        self.ids = AutoTokenizer.from_pretrained(str(model)).encode(path.read_text(encoding="utf-8"))
        self.at = 0

    def take(self, n: int) -> list[int]:
        if self.at + n > len(self.ids):
            self.at = 0  # wrap around (only in very long runs): prefix caches are emptied between loads anyway
        out = self.ids[self.at:self.at + n]
        self.at += n
        return out


def _held_out_loss(model: Path) -> float | None:
    """The trained checkpoint's held-out loss (train_report.json): which training run a result comes from (the
    deep pair is rebuilt by train_deep.py, and runs of the same recipe differ a little)."""
    for d in (model, DEEP / "identity"):  # vLLM's Llama is exported from the identity twin
        report = d / "train_report.json"
        if report.exists():
            return json.loads(report.read_text()).get("held_out_loss")
    return None


def _prefill_stats(e):
    model = model_of(e.llm)
    prefill = getattr(getattr(model, "model", None), "prefill", None)
    return None if prefill is None else prefill.stats.snapshot()


def _passes_between(before, after) -> float | None:
    if before is None:
        return None
    n = after["prefills"] - before["prefills"]
    total = sum(k * (a - b) for k, (a, b) in enumerate(zip(after["passes"], before["passes"])))
    return total / n if n else None


def prefill_part(engines: dict, text: Text, lens: list[int], reps: int) -> dict:
    from benchmarks.bench.metrics import median, ratio

    ttft = {n: {L: [] for L in lens} for n in engines}
    passes = {n: {L: [] for L in lens} for n in engines}
    for rep in range(reps):
        for L in lens:
            prompt = text.take(L)
            names = list(engines) if rep % 2 == 0 else list(engines)[::-1]
            for name in names:
                e = engines[name]
                e.set_budget(None)  # empties the prefix cache
                before = _prefill_stats(e)
                s = e.run([prompt], 1).samples[0]
                ttft[name][L].append((s["tokens"][0] - s["arrival"]) * 1000)
                if before is not None:
                    passes[name][L].append(_passes_between(before, _prefill_stats(e)))
            print(f"  prefill {L}: " + ", ".join(f"{n} {ttft[n][L][-1]:.0f} ms" for n in engines), flush=True)
    out = {}
    for name in engines:
        out[name] = {
            "ttft_ms": {str(L): median(ttft[name][L]) for L in lens},
            "ratio_vs_identity": {str(L): median([ratio(a, b) for a, b in zip(ttft[name][L], ttft["identity"][L])])
                                  for L in lens},
            "ratio_vs_llama": {str(L): median([ratio(a, b) for a, b in zip(ttft[name][L], ttft["llama"][L])])
                               for L in lens},
            "passes": {str(L): passes[name][L] for L in lens} if passes[name][lens[0]] else None,
        }
    return {"lengths": lens, "reps": reps, "engines": out}


BLOCK_SIZES = (0, 64, 128, 256, 512)


def blocks_part(specs: dict, text: Text, lens: list[int], reps: int, kw: dict, alloc: int) -> dict:
    from benchmarks.bench.metrics import median, ratio
    from benchmarks.bench.offline import OfflineEngine

    engines = {}
    try:
        for name, (path, env) in [("identity", specs["identity"])] + [
                (f"block {b}", (specs["lckv"][0], {"LCKV_PREFILL_BLOCK": str(b)})) for b in BLOCK_SIZES]:
            e = OfflineEngine(name, path, BLOCK, alloc, kw, env=env)
            e.start()
            e.run([text.take(8), text.take(8)], 4)
            e.run([text.take(256)], 1)
            engines[name] = e
        ttft = {n: {L: [] for L in lens} for n in engines}
        rows = {n: {L: [] for L in lens} for n in engines}
        for rep in range(reps):
            for L in lens:
                prompt = text.take(L)
                for name in (list(engines) if rep % 2 == 0 else list(engines)[::-1]):
                    e = engines[name]
                    e.set_budget(None)
                    before = _prefill_stats(e)
                    s = e.run([prompt], 1).samples[0]
                    ttft[name][L].append((s["tokens"][0] - s["arrival"]) * 1000)
                    if before is not None:
                        after = _prefill_stats(e)
                        rows[name][L].append((after["recomputed_tokens"] - before["recomputed_tokens"]) / L)
                print(f"  blocks {L}: " + ", ".join(f"{n} {ttft[n][L][-1]:.0f} ms" for n in engines), flush=True)
    finally:
        for e in engines.values():
            e.close()
    return {"lengths": lens, "reps": reps, "engines": {
        name: {"ttft_ms": {str(L): median(ttft[name][L]) for L in lens},
               "ratio_vs_identity": {str(L): median([ratio(a, b) for a, b in zip(ttft[name][L], ttft["identity"][L])])
                                     for L in lens},
               "rows_per_token": {str(L): median(rows[name][L]) for L in lens} if rows[name][lens[0]] else None}
        for name in engines}}


def loads_part(engines: dict, text: Text, workloads: dict, budgets: list[dict], rounds: int, requests: int) -> dict:
    from benchmarks.bench.metrics import median, ratio, summarize

    per: dict = {}
    for r in range(rounds):
        for wname, (plen, olen) in workloads.items():
            for b in budgets:
                prompts = [text.take(plen) for _ in range(requests)]
                names = list(engines) if r % 2 == 0 else list(engines)[::-1]
                for name in names:
                    e = engines[name]
                    e.set_budget(b["bytes"])
                    run = e.run(prompts, olen)
                    res = summarize(run.samples, run.duration)
                    res.update(preemptions=run.preemptions, max_concurrency=run.max_concurrency,
                               kv_capacity_tokens=e.capacity_tokens(b["bytes"]))
                    per.setdefault((wname, b["label"]), {}).setdefault(name, []).append(res)
                row = per[(wname, b["label"])]
                print(f"  r{r} {wname} {b['label']}: " + ", ".join(
                    f"{n} {row[n][-1]['output_throughput']:.0f} tok/s" for n in engines), flush=True)
    out: dict = {}
    for (wname, label), row in per.items():
        cell = {}
        for name, runs in row.items():
            cell[name] = {
                "output_tok_s": median([x["output_throughput"] for x in runs]),
                "vs_llama": median([ratio(a["output_throughput"], b["output_throughput"])
                                    for a, b in zip(runs, row["llama"])]),
                "vs_identity": median([ratio(a["output_throughput"], b["output_throughput"])
                                       for a, b in zip(runs, row["identity"])]),
                "mean_ttft_ms": median([x["mean_ttft_ms"] for x in runs]),
                "mean_tpot_ms": median([x["mean_tpot_ms"] for x in runs]),
                "preemptions": median([x["preemptions"] for x in runs]),
                "max_concurrency": median([x["max_concurrency"] for x in runs]),
                "kv_capacity_tokens": runs[0]["kv_capacity_tokens"],
            }
        out.setdefault(wname, {})[label] = cell
    return out


def chat_part(specs: dict, text_path: Path, args) -> dict:
    from lckv_vllm.tools.harness import BIN as bin_dir, free_port, lckv_serve_cmd, read_metrics, serve, server_env

    out, light = {}, {}
    work = ROOT / "models" / "prefill_tax"
    work.mkdir(parents=True, exist_ok=True)
    for name in ENGINES:
        path, env_extra = specs[name]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = work / f"chat-{name}.log"
        cmd = lckv_serve_cmd(path, port, "--served-model-name", name, "--dtype", "float32", "--block-size", str(BLOCK),
                             "--enforce-eager", "--kv-cache-memory-bytes", str(args.chat_kv_bytes),
                             "--max-num-seqs", "16", "--max-model-len", "2048", "--seed", "0")
        env = server_env(**env_extra)
        with serve(cmd, log, url, env, name=name, timeout=300, stop_timeout=60):
            result = work / f"chat-{name}.json"
            load_env = dict(env, LCKV_LOAD_MODEL=name, LCKV_LOAD_OUT=str(result), LCKV_CHAT_TEXT=str(text_path),
                            LCKV_CHAT_TURNS=str(args.turns), LCKV_CHAT_CONVERSATIONS=str(args.conversations),
                            LCKV_CHAT_MAX_TOKENS="32")
            # one warm-up conversation first (not measured), so first-call costs stay out
            warm = dict(load_env, LCKV_CHAT_CONVERSATIONS="1", LCKV_LOAD_OUT=str(work / "warm.json"),
                        LCKV_CHAT_FIRST_CONVERSATION=str(WARM_FIRST))
            locust = [str(bin_dir / "locust"), "-f", str(ROOT / "loadtests" / "chat_locustfile.py"), "--headless",
                      "-H", url, "--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING"]
            subprocess.run(locust + ["-u", "1", "-r", "1", "-t", "120s"], env=warm, check=False,
                           stdout=subprocess.DEVNULL, timeout=300)
            print(f"  chat {name}: {args.users} users, {args.conversations} conversations", flush=True)
            subprocess.run(locust + ["-u", str(args.users), "-r", str(args.users), "-t", "600s"], env=load_env,
                           check=False, stdout=subprocess.DEVNULL, timeout=900)
            out[name] = json.loads(result.read_text())
            if args.light_users and name != "lckv-fixed":
                # the same conversations' shape at light load, on texts this server has not seen: what a turn
                # costs without queueing behind the others
                light_out = work / f"chat-{name}-light.json"
                print(f"  chat {name}: {args.light_users} user(s), light load", flush=True)
                subprocess.run(locust + ["-u", str(args.light_users), "-r", str(args.light_users), "-t", "600s"],
                               env=dict(load_env, LCKV_LOAD_OUT=str(light_out),
                                        LCKV_CHAT_FIRST_CONVERSATION=str(LIGHT_FIRST)),
                               check=False, stdout=subprocess.DEVNULL, timeout=900)
                light[name] = json.loads(light_out.read_text())
            m = read_metrics(url)
            out[name]["prefill_passes_mean"] = (m["lckv_prefill_passes_sum"] / m["lckv_prefill_passes_count"]
                                                if m.get("lckv_prefill_passes_count") else None)
            print("    TTFT per turn " + ", ".join(f"{t}: {v['ttft']['mean_ms']:.0f} ms"
                                                    for t, v in out[name]["per_turn"].items())
                  + f"; hit rate {out[name]['prefix_cache_hit_rate']:.2f}", flush=True)
    for res in (out, light):
        for name, r in res.items():
            for t, v in r["per_turn"].items():
                base = res["identity"]["per_turn"][t]["ttft"]["mean_ms"]
                v["ttft_vs_identity"] = v["ttft"]["mean_ms"] / base if base else None
    return out, light


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer lengths, rounds and conversations")
    ap.add_argument("--parts", default="prefill,loads,blocks,chat")
    ap.add_argument("--prefill-lens", default="64,128,256,512,1024,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--light-users", type=int, default=1, help="a second chat load at this many users (0: none)")
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--chat-kv-bytes", type=int, default=64 << 20)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    if args.plot_only:
        write_outputs(json.loads((RESULTS / "prefill_tax.json").read_text()))
        return 0
    if args.quick:
        args.prefill_lens, args.reps, args.rounds, args.conversations = "64,512,2048", 1, 1, 4
    parts = set(args.parts.split(","))
    lens = [int(x) for x in args.prefill_lens.split(",")]

    from benchmarks.bench.offline import OfflineEngine, kv_bytes_per_block

    from lckv_vllm.tools.harness import machine
    from benchmarks.train_shakespeare import corpus

    _, held = corpus()
    specs = engine_specs()
    text = Text(held, specs["identity"][0])
    workloads = {"paper": (16, 128), "prompt-heavy": (64, 16)}
    llama_bpb = kv_bytes_per_block(specs["llama"][0], BLOCK)
    paper_blocks = math.ceil(sum(workloads["paper"]) / BLOCK)
    max_len = math.ceil((max(lens) + 64) / BLOCK) * BLOCK
    alloc_blocks = max(args.requests * paper_blocks + 1, max_len // BLOCK + 2, 10 * paper_blocks + 1)
    alloc = alloc_blocks * llama_bpb
    budgets = [{"label": f"{k} seq", "bytes": (k * paper_blocks + 1) * llama_bpb} for k in (2, 4, 10)]
    budgets.append({"label": "no limit", "bytes": None})
    report = {"machine": machine(), "command": command_line("benchmarks.prefill_tax", argv),
              "settings": {"dtype": "float32", "block_size": BLOCK, "eager": True, "max_model_len": max_len,
                           "max_num_batched_tokens": max_len, "kv_allocation_bytes": alloc,
                           "budgets": budgets, "engines": {n: {"checkpoint": str(p.relative_to(ROOT)), "env": e,
                                                              "held_out_loss": _held_out_loss(p)}
                                                          for n, (p, e) in specs.items()}}}
    t0 = time.time()
    if parts & {"prefill", "loads"}:
        engines = {}
        kw = dict(dtype="float32", max_model_len=max_len, max_num_batched_tokens=max_len, seed=0,
                  max_num_seqs=256, enforce_eager=True)
        try:
            for name in ENGINES:
                path, env = specs[name]
                e = OfflineEngine(name, path, BLOCK, alloc, kw, env=env)
                e.start()
                e.run([text.take(8), text.take(8)], 4)  # warm-up
                e.run([text.take(256)], 1)
                engines[name] = e
                print(f"started {name} ({e.startup_s:.0f} s)", flush=True)
            if "prefill" in parts:
                report["prefill"] = prefill_part(engines, text, lens, args.reps)
            if "loads" in parts:
                report["loads"] = loads_part(engines, text, workloads, budgets, args.rounds, args.requests)
                report["settings"]["workloads"] = workloads
                report["settings"]["rounds"] = args.rounds
                report["settings"]["requests"] = args.requests
        finally:
            for e in engines.values():
                e.close()
    if "blocks" in parts:
        kw = dict(dtype="float32", max_model_len=max_len, max_num_batched_tokens=max_len, seed=0,
                  max_num_seqs=256, enforce_eager=True)
        report["blocks"] = blocks_part(specs, text, [L for L in lens if L >= 256], args.reps, kw, alloc)
    if "chat" in parts:
        report["chat"], light = chat_part(specs, held, args)
        if light:
            report["chat_light"] = light
        report["settings"]["chat"] = {"users": args.users, "light_users": args.light_users,
                                      "conversations": args.conversations,
                                      "turns": args.turns, "max_tokens": 32, "kv_cache_bytes": args.chat_kv_bytes,
                                      "system_prompt_chars": 1200, "user_message_chars": 160}
    report["elapsed_s"] = round(time.time() - t0, 1)
    old = RESULTS / "prefill_tax.json"
    if old.exists() and parts != {"prefill", "loads", "blocks", "chat"}:  # a partial run keeps the other parts
        before = json.loads(old.read_text())
        settings = {**before.get("settings", {}), **report["settings"]}
        report = {**before, **report, "settings": settings}
        report["elapsed_s_by_parts"] = {**before.get("elapsed_s_by_parts", {}),
                                        ",".join(sorted(parts)): report["elapsed_s"]}
    write_outputs(report)
    return 0


def _ttft_axes(ax, title: str) -> None:
    """A TTFT-ratio panel: log2 prompt lengths, the 3x line the prefill cost is held to."""
    ax.axhline(3, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT / identity TTFT")
    ax.set_title(title, fontsize=10)


def write_outputs(report: dict) -> None:
    lines = []
    if "prefill" in report:
        p = report["prefill"]
        lines += ["**Prefill TTFT** (one prompt, held-out text; ratio to identity, median of rounds; LCKV passes "
                  "used)", "", "| prompt tokens | identity ms | vLLM Llama | lckv-fixed (m+b) | lckv (adaptive) | "
                  "adaptive passes |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
        for L in p["lengths"]:
            e = p["engines"]
            passes = e["lckv"]["passes"][str(L)] if e["lckv"]["passes"] else []
            lines.append(f"| {L} | {e['identity']['ttft_ms'][str(L)]:.0f} | "
                         f"{e['llama']['ratio_vs_identity'][str(L)]:.2f}x | "
                         f"{e['lckv-fixed']['ratio_vs_identity'][str(L)]:.2f}x | "
                         f"{e['lckv']['ratio_vs_identity'][str(L)]:.2f}x | "
                         f"{', '.join(f'{x:g}' for x in passes if x is not None)} |")
        lines.append("")
    if "blocks" in report:
        b = report["blocks"]
        names = [n for n in b["engines"] if n != "identity"]
        lines += ["**Prefill blocks** (`LCKV_PREFILL_BLOCK`; one prompt; TTFT ratio to identity, median of rounds; "
                  "rows the cyclic segment recomputed per prompt token)", "",
                  "| prompt tokens | identity ms | " + " | ".join(names) + " |",
                  "| ---: | ---: |" + " ---: |" * len(names)]
        for L in b["lengths"]:
            e = b["engines"]
            lines.append(f"| {L} | {e['identity']['ttft_ms'][str(L)]:.0f} | " + " | ".join(
                f"{e[n]['ratio_vs_identity'][str(L)]:.2f}x ({e[n]['rows_per_token'][str(L)]:.2f})" for n in names)
                + " |")
        lines.append("")
    if "loads" in report:
        for wname, cells in report["loads"].items():
            lines += [f"**Offline {wname} load** (output tok/s, ratio to vLLM's Llama)", "",
                      "| KV budget | " + " | ".join(ENGINES) + " |", "| --- |" + " ---: |" * len(ENGINES)]
            for label, cell in cells.items():
                lines.append(f"| {label} | " + " | ".join(
                    f"{cell[n]['output_tok_s']:.0f} ({cell[n]['vs_llama']:.2f}x)" for n in ENGINES) + " |")
            lines.append("")
    chat_users = report.get("settings", {}).get("chat", {})
    for key, title in (("chat", f"{chat_users.get('users', 4)} users at once"),
                       ("chat_light", f"{chat_users.get('light_users', 1)} user, light load")):
        if key not in report:
            continue
        c = report[key]
        turns = list(next(iter(c.values()))["per_turn"])
        lines += [f"**Served multi-turn chat, {title}** (TTFT mean ms per turn, ratio to identity; prefix-cache hit "
                  "rate; TPOT)", "", "| engine | " + " | ".join(f"turn {t}" for t in turns) +
                  " | hit rate | TPOT ms | output tok/s |", "| --- |" + " ---: |" * (len(turns) + 3)]
        for name, r in c.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{r['per_turn'][t]['ttft']['mean_ms']:.0f} ({r['per_turn'][t]['ttft_vs_identity']:.2f}x)"
                for t in turns) + f" | {r['prefix_cache_hit_rate']:.2f} | {r['tpot']['mean_ms']:.1f} | "
                f"{r['output_token_throughput_per_s']:.0f} |")
        lines.append("")
    write_results(RESULTS / "prefill_tax.json", report, indent=1, markdown="\n".join(lines))
    print("\n".join(lines))

    plt = pyplot()

    panels = [k for k in ("prefill", "blocks", "loads", "chat") if k in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, part in zip(axes[0], panels):
        if part == "prefill":
            p = report["prefill"]
            for name in ("llama", "lckv-fixed", "lckv"):
                ax.plot(p["lengths"], [p["engines"][name]["ratio_vs_identity"][str(L)] for L in p["lengths"]], "o-",
                        label=name)
            _ttft_axes(ax, "prefill")
        elif part == "blocks":
            b = report["blocks"]
            for name in b["engines"]:
                if name != "identity":
                    ax.plot(b["lengths"], [b["engines"][name]["ratio_vs_identity"][str(L)] for L in b["lengths"]],
                            "o-", label=name)
            _ttft_axes(ax, "prefill blocks (LCKV_PREFILL_BLOCK)")
        elif part == "loads":
            labels = list(next(iter(report["loads"].values())))
            for wname, cells in report["loads"].items():
                for name, style in (("lckv-fixed", "--"), ("lckv", "-")):
                    ax.plot(labels, [cells[b][name]["vs_llama"] for b in labels], style, marker="o",
                            label=f"{name}, {wname}")
            ax.axhline(1, color="grey", lw=1)
            ax.set_ylabel("output tok/s / vLLM Llama")
            ax.set_xlabel("KV budget")
            ax.set_title("offline loads", fontsize=10)
        else:
            for name, r in report["chat"].items():
                turns = list(r["per_turn"])
                ax.plot([int(t) for t in turns], [r["per_turn"][t]["ttft"]["mean_ms"] for t in turns], "o-",
                        label=f"{name} (hit rate {r['prefix_cache_hit_rate']:.2f})")
            ax.set_yscale("log")
            ax.set_xticks(range(1, len(turns) + 1))
            ax.set_xlabel("turn")
            ax.set_ylabel("TTFT mean, ms (log scale)")
            ax.set_title("multi-turn chat, served", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, RESULTS / "prefill_tax.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
