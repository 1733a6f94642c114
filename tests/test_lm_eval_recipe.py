"""The lm-eval-harness recipe (benchmarks/lm_eval_recipe.py, docs/hf_tools.md "Evaluating with lm-eval-harness").

Needs no lm-eval: it checks the task files the recipe writes (YAML fields, deterministic non-empty data, how
prompts and targets are built), the token-id requests it says lm-eval sends (BOS handling), and the committed
results (benchmarks/results/lm_eval.json): their structure, that lckv-serve and vllm serve gave identical scores,
and that the exact-mode scores are what the float64 reference and an in-process engine compute for the same
requests."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from conftest import ROOT, TRAINED_W2

SPEC = importlib.util.spec_from_file_location("lm_eval_recipe", ROOT / "benchmarks" / "lm_eval_recipe.py")
R = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(R)

RESULTS = ROOT / "benchmarks" / "results" / "lm_eval.json"
EXACT = {"LCKV_CHUNKED_PREFILL": "0", "LCKV_PREFILL_TOL": "0"}


@pytest.fixture(scope="module")
def text():
    return R.HELDOUT.read_text(encoding="utf-8")  # committed: the test never makes it


@pytest.fixture(scope="module")
def tok():
    from transformers import PreTrainedTokenizerFast  # the plugin-free route (docs/hf_tools.md)

    return PreTrainedTokenizerFast.from_pretrained(str(TRAINED_W2))


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def test_task_files(tmp_path, text, results):
    yaml = pytest.importorskip("yaml")
    tasks = R.write_tasks(tmp_path)
    assert set(tasks) == {R.PPL_TASK, R.MC_TASK}
    again = R.write_tasks(tmp_path / "again")
    for name, t in tasks.items():
        cfg = yaml.safe_load(Path(t["yaml"]).read_text())
        assert cfg["task"] == name and cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        assert data == t["file"] and data.startswith("/")  # absolute: lm-eval may run from anywhere
        rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
        assert rows and len(rows) == t["docs"]
        assert again[name]["sha256"] == t["sha256"]  # deterministic
        assert results["tasks"][name] == {"docs": t["docs"], "sha256": t["sha256"]}  # the data that was scored
    ppl = yaml.safe_load(Path(tasks[R.PPL_TASK]["yaml"]).read_text())
    assert ppl["output_type"] == "loglikelihood_rolling" and ppl["doc_to_text"] == "" and ppl["doc_to_target"] == "text"
    assert [m["metric"] for m in ppl["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    mc = yaml.safe_load(Path(tasks[R.MC_TASK]["yaml"]).read_text())
    assert mc["output_type"] == "multiple_choice" and mc["target_delimiter"] == ""
    assert (mc["doc_to_text"], mc["doc_to_choice"], mc["doc_to_target"]) == ("context", "choices", "label")
    assert [m["metric"] for m in mc["metric_list"]] == ["acc", "acc_norm"]


def test_ppl_docs_cover_the_held_out_text(text):
    docs = R.ppl_docs(text)
    assert len(docs) == R.PPL_DOCS and [d["doc_id"] for d in docs] == list(range(R.PPL_DOCS))
    pos = 0
    for d in docs:  # in order, no overlap, whole speeches (cut at blank lines)
        assert d["text"].strip() and d["text"] == d["text"].strip("\n")
        i = text.index(d["text"], pos)
        assert i == 0 or text[i - 1] == "\n"  # whole lines
        pos = i + len(d["text"])
    assert re.sub(r"\s+", "", "".join(d["text"] for d in docs)) == re.sub(r"\s+", "", text)
    assert R.ppl_docs("A.\nxxxx\n\nB.\ny\n", 2) == [{"doc_id": 0, "text": "A.\nxxxx"}, {"doc_id": 1, "text": "B.\ny"}]
    assert R.ppl_docs("A.\nxxxx\nyyyy\n", 2) == [{"doc_id": 0, "text": "A.\nxxxx"}, {"doc_id": 1, "text": "yyyy"}]
    assert R.ppl_docs("A.\nxx\nyyyy\n\nB.\ny\n", 2, slack=3)[0]["text"] == "A.\nxx\nyyyy"  # a blank line near


def test_word_order_items(text):
    docs = R.word_order_docs(text)
    assert docs == R.word_order_docs(text) and len(docs) == R.MC_DOCS
    lines = text.split("\n")
    for d in docs:
        i = d["line"]
        true = " ".join(lines[i].split())
        assert d["context"] == "\n".join(lines[i - R.MC_CONTEXT_LINES:i]) + "\n"
        assert R.is_verse(lines[i]) and R.is_verse(lines[i - 1]) and len(lines[i].split()) >= R.MC_MIN_WORDS
        assert len(d["choices"]) == R.MC_CHOICES == len(set(d["choices"]))
        assert d["choices"][d["label"]] == true
        assert all(sorted(c.split(" ")) == sorted(true.split()) for c in d["choices"])  # same words, other orders
    assert len({d["label"] for d in docs}) == R.MC_CHOICES  # the true line is not always in one place
    # the first item, spelled out
    d = docs[0]
    assert d["context"] == ("\nBOY.\nAt your own house; there he unarms him.\n\nPANDARUS.\n"
                            "Good boy, tell him I come.Exit Boy\n")
    assert d["choices"][d["label"]] == "I doubt he be hurt. Fare ye well, good niece."
    assert not R.is_verse("PANDARUS.") and not R.is_verse("FIRST LORD.") and not R.is_verse("[Exit PANDARUS.]")
    assert R.is_verse("Adieu, uncle.")


def test_the_text_is_held_out(text, results):
    """The committed excerpt is the start of the examples' held-out split, which shares no 200-character piece with
    their training text (checked where benchmarks/train_shakespeare.py's corpus is on disk; CI has only the
    excerpt).  benchmarks/results/shakespeare_heldout.txt, the middle of The Tempest, is training text."""
    import hashlib

    assert results["text"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert results["text"]["pieces_of_200_chars_in_training_text"] == 0
    if not R.SPLIT.exists():
        pytest.skip("models/shakespeare/heldout.txt not here (python benchmarks/train_shakespeare.py makes it)")
    assert text == R.excerpt(R.SPLIT.read_text(encoding="utf-8"))
    assert R.training_overlap(text) == 0


def test_requests_and_bos(tok, text):
    """What lm-eval sends with tokenized_requests=True, add_bos_token=False: rolling documents as [BOS] + text with
    BOS as the only context token; multiple-choice prompts without BOS, the context's trailing newline moved into
    the scored continuation."""
    assert tok.bos_token == "<s>" and tok.bos_token_id == 1
    assert tok("x").input_ids[0] == 1 and tok("x", add_special_tokens=False).input_ids[0] != 1  # adds BOS itself
    ppl, mc = R.ppl_docs(text), R.word_order_docs(text)
    reqs = R.lm_eval_requests(tok, ppl, mc)
    assert len(reqs) == len(ppl) + R.MC_CHOICES * len(mc)
    for r, d in zip(reqs, ppl):
        assert r["ctxlen"] == 1 and r["prompt"][0] == 1 and 1 not in r["prompt"][1:]
        assert tok.decode(r["prompt"][1:]) == d["text"]
    for r in reqs[len(ppl):]:
        d = mc[r["doc_id"]]
        assert 1 not in r["prompt"] and len(r["prompt"]) + 1 <= R.MAX_MODEL_LEN
        assert tok.decode(r["prompt"][:r["ctxlen"]]) == d["context"].rstrip("\n")
        assert tok.decode(r["prompt"][r["ctxlen"]:]) == "\n" + d["choices"][r["choice"]]
    assert max(len(r["prompt"]) for r in reqs) + 1 <= R.MAX_MODEL_LEN
    # the recipe's model_args say so
    args = dict(kv.split("=", 1) for kv in R.MODEL_ARGS.split(","))
    assert (args["tokenized_requests"], args["add_bos_token"], args["tokenizer_backend"]) == (
        "True", "False", "huggingface")
    assert args["max_length"] == str(R.MAX_MODEL_LEN)


def test_committed_results(results):
    assert results["tokenizer"]["bos_token_id"] == 1 and results["tokenizer"]["adds_bos"] is True
    assert {"cpu", "cores", "vllm", "lckv_vllm", "date"} <= set(results["machine"])
    assert set(results["results"]) == set(R.MODELS)
    docs = {t: results["tasks"][t]["docs"] for t in (R.PPL_TASK, R.MC_TASK)}
    for modes in results["results"].values():
        assert set(modes) == set(R.MODES)
        for mode, servers in modes.items():
            assert "lckv-serve" in servers
            for r in servers.values():
                p, m = r["metrics"][R.PPL_TASK], r["metrics"][R.MC_TASK]
                assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(p)
                assert math.isclose(p["bits_per_byte"], math.log2(p["byte_perplexity"]), rel_tol=1e-9)
                assert 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1
                assert len(r["per_doc"][R.PPL_TASK]) == docs[R.PPL_TASK]
                assert [len(x) for x in r["per_doc"][R.MC_TASK]] == [R.MC_CHOICES] * docs[R.MC_TASK]
                # the per-document sums give lm-eval's perplexity: nats over the documents' bytes
                nll = -sum(r["per_doc"][R.PPL_TASK])
                assert math.isclose(math.exp(nll / results["ppl_bytes"]), p["byte_perplexity"], rel_tol=1e-9)
                assert math.isclose(math.exp(nll / results["ppl_words"]), p["word_perplexity"], rel_tol=1e-9)
                # lm-eval's log-likelihoods are the server's for the requests test_requests_and_bos builds
                assert r["max_abs_diff_lm_eval_vs_direct"] < 1e-3
                assert mode != "exact" or r["env"] == EXACT
                assert "lm_eval --model local-completions" in r["lm_eval_command"]
                assert "tokenized_requests=True" in r["lm_eval_command"]
    # lckv-serve and vllm serve: identical per-document log-likelihoods wherever both ran
    both = [(mo, md) for mo, modes in results["results"].items() for md, s in modes.items() if len(s) > 1]
    assert both and results["servers_identical"] == {f"{mo}/{md}": True for mo, md in both}
    for mo, md in both:
        s = results["results"][mo][md]
        assert s["lckv-serve"]["per_doc"] == s["vllm serve"]["per_doc"]
        assert s["lckv-serve"]["metrics"] == s["vllm serve"]["metrics"]
    # the identity plan has no iterative prefill: its two modes give the same scores (up to rounding)
    ident = results["results"]["shakespeare-identity"]
    for a, b in zip(R.flat(ident["default"]["lckv-serve"]["per_doc"]), R.flat(ident["exact"]["lckv-serve"]["per_doc"])):
        assert abs(a - b) < 1e-3
    # default mode (adaptive passes, chunked prefill, prefix-cache hits) stays close to exact mode on the trained
    # LCKV model, without being the same (measured: at most 0.4 % of a request's log-likelihood, 2e-4 in all)
    w2 = results["results"]["shakespeare-lckv-w2"]
    default, exact = R.flat(w2["default"]["lckv-serve"]["per_doc"]), R.flat(w2["exact"]["lckv-serve"]["per_doc"])
    assert default != exact
    for a, b in zip(default, exact):
        assert abs(a - b) <= 1e-2 * abs(b)
    assert abs(sum(default) - sum(exact)) <= 1e-3 * abs(sum(exact))
    # tokenized_requests=False (recorded, not recommended) scores a span shifted by the server's BOS
    bad = results["tokenized_requests_false"]
    assert bad["max_abs_diff_vs_direct"] > 1


def _subset(reqs, docs: int, items: int) -> list[int]:
    """Indices into the requests: the `docs` shortest ppl documents and every choice of the first `items` items
    (a subset keeps the float64 reference and the engine inside a few seconds on a busy 2-core machine)."""
    short = sorted(range(R.PPL_DOCS), key=lambda i: len(reqs[i]["prompt"]))[:docs]
    return short + [R.PPL_DOCS + c for c in range(items * R.MC_CHOICES)]


def test_exact_scores_match_the_reference(tok, text, results):
    """Committed exact-mode log-likelihoods of the LCKV model (lm-eval through lckv-serve) against the float64
    reference's whole-prompt iterative encoding with m+b passes, which is what exact mode serves: the 2 shortest
    rolling documents and the choices of the first 2 items.  One torch thread: these small float64 matmuls run
    ~50x slower on 2 threads when the cores are busy."""
    import torch

    from lckv_vllm.reference_model import ReferenceModel

    reqs = R.lm_eval_requests(tok, R.ppl_docs(text), R.word_order_docs(text))
    got = R.flat(results["results"]["shakespeare-lckv-w2"]["exact"]["lckv-serve"]["per_doc"])
    ref = ReferenceModel(TRAINED_W2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in _subset(reqs, 2, 2):
            ids = torch.tensor(reqs[i]["prompt"])
            logp = torch.log_softmax(ref.forward_iterative(ids), -1)[torch.arange(len(ids) - 1), ids[1:]]
            want = float(logp[reqs[i]["ctxlen"] - 1:].sum())  # ppl documents: every token after the BOS
            assert abs(got[i] - want) < 1e-3, (i, got[i], want)
    finally:
        torch.set_num_threads(threads)


def test_exact_scores_replayed_in_process(engine, tok, text, results):
    """The same requests against an in-process engine in exact mode (prompt log-probs): the log-likelihoods of the
    committed lckv-serve run of lm-eval."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    reqs = R.lm_eval_requests(tok, R.ppl_docs(text), R.word_order_docs(text))
    picks = _subset(reqs, 2, 2)
    llm = engine(str(TRAINED_W2), env=EXACT)
    outs = llm.generate([TokensPrompt(prompt_token_ids=reqs[i]["prompt"]) for i in picks],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)
    got = R.flat(results["results"]["shakespeare-lckv-w2"]["exact"]["lckv-serve"]["per_doc"])
    for i, o in zip(picks, outs):
        r = reqs[i]
        ll = sum(o.prompt_logprobs[j][t].logprob for j, t in enumerate(r["prompt"]) if j >= r["ctxlen"])
        assert abs(ll - got[i]) < 1e-3, (r["task"], r["doc_id"], ll, got[i])
