"""Aggregation of the rounds, the ratios, the markdown tables and the plots of `lckv-vllm bench`."""

from __future__ import annotations

from pathlib import Path

from lckv_vllm.tools.harness import pyplot, save_figure

from .metrics import LATENCY_FIELDS, median, ratio

# Fields every engine result carries (offline and served), besides its per-round values and ratios.
POINT_FIELDS = ("kv_budget_bytes", "kv_capacity_tokens", "kv_blocks", "fits_sequences", "max_concurrency",
                "mean_concurrency", "preemptions", "output_throughput", "request_throughput",
                "total_token_throughput", "duration_s") + LATENCY_FIELDS
FIXED_FIELDS = ("kv_budget_bytes", "kv_capacity_tokens", "kv_blocks", "fits_sequences")
# What the ratios compare: throughputs, concurrency, capacity and every latency statistic.
RATIO_FIELDS = ("output_throughput", "request_throughput", "max_concurrency", "kv_capacity_tokens") + LATENCY_FIELDS
REFERENCES = ("identity", "llama", "ceiling")
ENGINE_LABELS = {"llama": "vLLM Llama", "identity": "identity", "w2": "LCKV w2", "w10": "LCKV w10 (released)",
                 "sandwich": "sandwich-middle", "cla": "CLA-2", "ceiling": "ceiling (identity, no KV limit)"}
COLORS = {"llama": "black", "identity": "tab:grey", "w2": "tab:blue", "w10": "tab:green", "sandwich": "tab:orange",
          "cla": "tab:purple", "ceiling": "tab:red"}


def aggregate(rounds: list[dict]) -> dict:
    """Per-round results of one engine at one point -> medians (max for the largest concurrency)."""
    out = {}
    for f in POINT_FIELDS:
        vals = [r.get(f) for r in rounds]
        if f in FIXED_FIELDS:  # the same in every round
            out[f] = vals[0]
        elif f == "max_concurrency":
            out[f] = max((v for v in vals if v is not None), default=None)
        else:
            out[f] = median(vals)
    out["rounds"] = rounds
    return out


def add_ratios(engines: dict[str, dict]) -> None:
    """For every engine: vs_identity, vs_llama, vs_ceiling = median over rounds of the per-round ratios (each
    round ran the engines of a point back to back, so a round's ratio cancels the machine's slow drifts)."""
    for res in engines.values():
        for ref in REFERENCES:
            base = engines.get(ref)
            key = f"vs_{ref}"
            if base is None:
                res[key] = None
                continue
            res[key] = {}
            for f in RATIO_FIELDS:
                per_round = [ratio(a.get(f), b.get(f)) for a, b in zip(res["rounds"], base["rounds"])]
                res[key][f] = median(per_round)


# ---- markdown ---------------------------------------------------------------------------------------------------
def _n(v, fmt="{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _lat(r: dict, name: str) -> str:
    vals = [r.get(f"{s}_{name}_ms") for s in ("mean", "p50", "p99")]
    return " / ".join(_n(v) for v in vals)


def _vs(r: dict, ref: str, field: str = "output_throughput") -> str:
    v = r.get(f"vs_{ref}")
    return _x(v.get(field)) if v else "-"


TABLE_HEAD = ("| budget | engine | KV capacity (tokens) | fits | conc. max / mean | preempt. | output tok/s | vs identity "
              "| vs Llama | vs ceiling | TTFT ms mean / p50 / p99 | TPOT ms | ITL ms | E2EL ms |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def _row(budget: str, name: str, r: dict) -> str:
    return (f"| {budget} | {ENGINE_LABELS.get(name, name)} | {_n(r.get('kv_capacity_tokens'))} | "
            f"{_n(r.get('fits_sequences'))} | {_n(r.get('max_concurrency'))} / {_n(r.get('mean_concurrency'), '{:.1f}')} | "
            f"{_n(r.get('preemptions'))} | "
            f"{_n(r.get('output_throughput'))} | {_vs(r, 'identity')} | {_vs(r, 'llama')} | {_vs(r, 'ceiling')} | "
            f"{_lat(r, 'ttft')} | {_lat(r, 'tpot')} | {_lat(r, 'itl')} | {_lat(r, 'e2el')} |")


def markdown(rep: dict) -> str:
    s = rep["settings"]
    m = rep["machine"]
    lines = ["### Throughput at equal KV memory: results", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, vLLM {m['vllm']}, lckv-vllm "
             f"{m['lckv_vllm']}; {s['dtype']}, block size {s['block_size']}, "
             f"{'compiled (torch.compile)' if s['compiled'] else 'eager'}, max_num_seqs {s['max_num_seqs']}, "
             f"seed {s['seed']}.  Models: {s['model']}.",
             "KV budgets (bytes that hold N full paper-regime sequences for vLLM's Llama): "
             + ", ".join(f"{b['label']} = {b['bytes'] / 2**20:.2f} MiB" for b in s["budgets"]) + ".",
             "Workloads: " + "; ".join(f"{w['name']}: {w['prompt_len']} prompt + {w['output_len']} output tokens, "
                                       f"{w['requests']} requests" for w in s["workloads"]) + "."
             + (f"  Offline: every request added at once; {s['rounds']} round(s) per budget, {s['target_rounds']} "
                "at the target budget, alternating the order; medians; ratios are medians of per-round ratios."
                if rep.get("offline") else "")
             + "  Ceiling: identity with the whole allocation (memory never limits), same load.  fits = full "
             "sequences of the workload the budget holds; latencies mean / p50 / p99 in ms.", ""]
    for wname, wres in rep.get("offline", {}).items():
        w = wres["workload"]
        lines += [f"**Offline, {wname}** ({w['prompt_len']} + {w['output_len']} tokens, {w['requests']} requests)", "",
                  TABLE_HEAD]
        for p in wres["points"]:
            if p.get("skipped"):
                lines.append(f"| {p['label']} | skipped: {p['skipped']} |" + " |" * 12)
            for name, r in p["engines"].items():
                lines.append(_row(p["label"], name, r))
        lines.append("")
    sv = rep.get("served")
    if sv:
        lines += [f"**Served** (lckv-serve, {sv['rate_per_s']:g} requests/s at fixed intervals, streamed; budget "
                  f"{sv['budget_label']}, ceiling: no limit; {sv['rounds']} round(s))", ""]
        for wname, wres in sv["workloads"].items():
            w = wres["workload"]
            lines += [f"*{wname}* ({w['prompt_len']} + {w['output_len']} tokens, {w['requests']} requests)", "",
                      TABLE_HEAD]
            for name, r in wres["models"].items():
                lines.append(_row(sv["budget_label"] if name != "ceiling" else "no limit", name, r))
            lines.append("")
    pf = rep.get("prefill")
    if pf:
        lens = pf["lengths"]
        lines += [f"**Prefill** (one request, TTFT; {pf['reps']} rep(s), median; ratio to identity, analytic "
                  "(cyclic layers x passes + other layers) / layers in brackets)", "",
                  "| plan | " + " | ".join(f"{n} tokens" for n in lens) + " |",
                  "| --- | " + " | ".join("---:" for _ in lens) + " |"]
        for name, r in pf["plans"].items():
            if name == "identity":
                cells = [f"{_n(r['ttft_ms'].get(str(n)))} ms" for n in lens]
            else:
                cells = [f"{_x(r['ratio_vs_identity'].get(str(n)))} ({_x(r['analytic_ratio'].get(str(n)))})"
                         for n in lens]
            lines.append(f"| {ENGINE_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
        lines.append("")
        be = pf.get("break_even")
        if be:
            meas = be.get("measured_prompt_heavy_vs_llama") or {}
            lines.append(f"Where LCKV stops paying off (estimate at budget {be['budget_label']}, against vLLM's "
                         f"Llama, from the paper-regime throughputs and the prefill cost at "
                         f"{be['reference_prompt_len']} tokens): " + "; ".join(
                             f"{ENGINE_LABELS.get(k, k)} {_be(v)}" for k, v in be["plans"].items()) + "."
                         + ("  Measured, prompt-heavy workload at that budget, output tok/s vs Llama: "
                            + ", ".join(f"{ENGINE_LABELS.get(k, k)} {_x(v)}" for k, v in meas.items()
                                        if k not in ("llama",)) + "." if meas else ""))
            lines.append("")
    t = rep.get("targets")
    if t and t["values"]:
        lines += [f"Targets at budget {t['budget_label']} (vLLM's Llama fits {t['llama_fits']} paper-regime "
                  "sequences): " + "; ".join(f"{k} = {_x(v)}" + (f" (goal {t['goals'][k]})" if k in t["goals"] else "")
                                             for k, v in t["values"].items()) + ".", ""]
    return "\n".join(lines)


def _be(v: dict) -> str:
    x = v.get("prompt_per_output")
    if v.get("note"):
        return f"({v['note']})"
    return f"ahead below {x:.1f} prompt tokens per output token" if x is not None else "-"


# ---- plots ------------------------------------------------------------------------------------------------------
def _engine_names(wres: dict) -> list[str]:
    return list(dict.fromkeys(n for p in wres["points"] for n in p["engines"]))


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plots(rep: dict, out: Path, prefix: str = "bench") -> list[Path]:
    plt = pyplot()
    written = []
    off = rep.get("offline", {})
    if off:
        fig, axes = plt.subplots(1, len(off), figsize=(6.5 * len(off), 4.5), squeeze=False)
        for ax, (wname, wres) in zip(axes[0], off.items()):
            for name in _engine_names(wres):
                pts = sorted((p["engines"][name]["mean_concurrency"] or 0, p["engines"][name]["output_throughput"] or 0)
                             for p in wres["points"] if name in p["engines"])
                ax.plot([a for a, _ in pts], [b for _, b in pts], "o-" if name != "ceiling" else "s",
                        color=COLORS.get(name), label=ENGINE_LABELS.get(name, name))
            _label(ax, "batch size (mean requests per engine step; one point per KV budget)", "output tokens/s",
                   f"{wname}: throughput vs batch size")
        written.append(save_figure(fig, out / f"{prefix}_batch.png", dpi=100))

        fig, axes = plt.subplots(1, len(off), figsize=(6.5 * len(off), 4.5), squeeze=False)
        for ax, (wname, wres) in zip(axes[0], off.items()):
            for name in _engine_names(wres):
                if name == "ceiling":
                    continue
                pts = [(p["kv_budget_bytes"] / 2**20, p["engines"][name]["output_throughput"] or 0)
                       for p in wres["points"] if name in p["engines"]]
                ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", color=COLORS.get(name),
                        label=ENGINE_LABELS.get(name, name))
            ceil = [p["engines"]["ceiling"]["output_throughput"] for p in wres["points"]
                    if "ceiling" in p["engines"] and p["engines"]["ceiling"]["output_throughput"]]
            if ceil:
                ax.axhline(median(ceil), color=COLORS["ceiling"], ls="--", label=ENGINE_LABELS["ceiling"])
            ax.set_xscale("log")
            _label(ax, "KV budget (MiB)", "output tokens/s", f"{wname}: throughput vs KV budget")
        written.append(save_figure(fig, out / f"{prefix}_budget.png", dpi=100))

    pf = rep.get("prefill")
    if pf:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        lens = pf["lengths"]
        for name, r in pf["plans"].items():
            if name == "identity":
                continue
            ax.plot(lens, [r["ratio_vs_identity"].get(str(n)) for n in lens], "o-", color=COLORS.get(name),
                    label=f"{ENGINE_LABELS.get(name, name)} measured")
            ax.plot(lens, [r["analytic_ratio"].get(str(n)) for n in lens], ":", color=COLORS.get(name),
                    label=f"{ENGINE_LABELS.get(name, name)} analytic")
        ax.set_xscale("log", base=2)
        _label(ax, "prompt tokens", "TTFT / identity TTFT", "prefill cost against identity")
        written.append(save_figure(fig, out / f"{prefix}_prefill.png", dpi=100))

    sv = rep.get("served")
    if sv:
        wl = sv["workloads"]
        fig, axes = plt.subplots(2, len(wl), figsize=(6.5 * len(wl), 7), squeeze=False)
        for col, (wname, wres) in enumerate(wl.items()):
            names = list(wres["models"])
            colors = [COLORS.get(n) for n in names]
            labels = [ENGINE_LABELS.get(n, n) for n in names]
            axes[0][col].bar(labels, [wres["models"][n]["output_throughput"] or 0 for n in names], color=colors)
            axes[0][col].set_ylabel("output tokens/s")
            axes[0][col].set_title(f"served, {wname}")
            axes[1][col].bar(labels, [wres["models"][n]["mean_tpot_ms"] or 0 for n in names], color=colors)
            axes[1][col].set_ylabel("mean TPOT (ms)")
            for ax in axes[:, col]:
                ax.tick_params(axis="x", labelsize=7, rotation=15)
        written.append(save_figure(fig, out / f"{prefix}_served.png", dpi=100))
    return written
