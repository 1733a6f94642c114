"""Deploy-time pattern choice: `lckv-vllm quality` (perplexity through vLLM under an override) against the
reference and against HF transformers, and `lckv-vllm plan --budget-gib` (candidates, footprint, recommendation)."""

import math
import subprocess
import sys

import torch

from lckv_vllm.tools import deploy
from lckv_vllm.tools.checkpoint import export_llama
from lckv_vllm.reference_model import ReferenceModel

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York, and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
        "wreaths, our bruised arms hung up for monuments, our stern alarums changed to merry meetings.") * 2
KW = dict(max_tokens=120, window=48, kv_bytes=16 << 20, engine_kwargs={"block_size": 16})


def _reference_nll(ref: ReferenceModel, windows) -> float:
    total, n = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(ref.forward_iterative(w).double(), -1)
        total -= sum(float(logp[i, w[i + 1]]) for i in range(len(w) - 1))
        n += len(w) - 1
    return total / n


def test_quality_equals_reference_perplexity(model_dir):
    """An identity checkpoint scored as itself and under a cyclic w2-like override (0_4_4_4_4_5: its producers 0, 4,
    5 all have k/v weights), each equal to the reference's perplexity under the same pattern."""
    path = model_dir("tiny-identity")
    patterns = [None, "0_4_4_4_4_5"]
    rows = deploy.perplexities(path, patterns, TEXT, progress=lambda m: None, **KW)
    windows = deploy.text_windows(path, TEXT, KW["max_tokens"], KW["window"])
    assert len(windows) >= 2 and rows[0]["tokens_scored"] == sum(len(w) - 1 for w in windows)
    for pattern, row in zip(patterns, rows):
        ref = ReferenceModel(path, overrides={"layer_types": pattern} if pattern else None)
        want = _reference_nll(ref, windows)
        assert abs(math.log(row["perplexity"]) - want) < 1e-4, (pattern, row, want)
    assert rows[1]["kv_bytes_per_token"] * 2 == rows[0]["kv_bytes_per_token"]  # 3 of 6 layers keep KV


def test_identity_quality_equals_transformers(model_dir, tmp_path):
    """The plugin's perplexity of an identity checkpoint equals HF transformers' on the same weights (as Llama)."""
    from transformers import AutoModelForCausalLM

    path = model_dir("tiny-identity")
    (row,) = deploy.perplexities(path, [None], TEXT, progress=lambda m: None, **KW)
    llama = AutoModelForCausalLM.from_pretrained(str(export_llama(path, tmp_path / "llama")),
                                                 dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for w in deploy.text_windows(path, TEXT, KW["max_tokens"], KW["window"]):
            logp = torch.log_softmax(llama(torch.tensor([w])).logits[0].double(), -1)
            total -= sum(float(logp[i, w[i + 1]]) for i in range(len(w) - 1))
            n += len(w) - 1
    hf = math.exp(total / n)
    assert abs(row["perplexity"] - hf) / hf < 0.005, (row["perplexity"], hf)


def test_candidates_respect_the_checkpoint_producers():
    ident = {"num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
             "layer_types": "0_1_2_3_4_5_6_7"}
    names = {c.name: c.layer_types for c in deploy.candidates(ident)}
    assert names == {"checkpoint": "0_1_2_3_4_5_6_7", "cla-2": "0_0_2_2_4_4_6_6", "cla-3": "0_0_0_3_3_3_6_6",
                     "cla-4": "0_0_0_0_4_4_4_4", "yoco-like": "0_1_2_3_3_3_3_3"}
    # a CLA-2 checkpoint has k/v only for even layers: every-3rd and YOCO-like (layer 3) cannot be served from it
    cla = dict(ident, layer_types="0_0_2_2_4_4_6_6")
    assert {c.name for c in deploy.candidates(cla)} == {"checkpoint", "cla-4"}


def test_footprint_and_recommendation():
    cfg = {"num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128,
           "layer_types": "0_1_2_3_4_5_6_7", "torch_dtype": "bfloat16"}
    rows = [deploy.footprint(cfg, c, 1 << 20, 100, 16, deploy.dtype_bytes(cfg)) for c in deploy.candidates(cfg)]
    ident = rows[0]
    assert ident["kv_bytes_per_token"] == 8 * 2 * 2 * 32 * 2
    assert ident["capacity_tokens"] == (1 << 20) // (ident["kv_bytes_per_token"] * 16) * 16
    assert ident["sequences"] == ident["capacity_tokens"] // 112  # 100 tokens take 7 blocks of 16
    assert deploy.recommend(rows, 1)["name"] == "cla-4"  # smallest footprint without perplexities
    for r, p in zip(rows, [10.0, 11.0, 15.0, 14.0, 12.0]):
        r["perplexity"] = p
    assert deploy.recommend(rows, 1)["name"] == "checkpoint"
    need = rows[1]["sequences"]  # cla-2's capacity: identity no longer fits
    assert deploy.recommend(rows, need)["name"] == "cla-2"
    assert deploy.recommend(rows, 10 ** 9) is None


def test_plan_cli_prints_the_override(model_dir):
    r = subprocess.run([sys.executable, "-m", "lckv_vllm.cli", "plan", str(model_dir("tiny-identity")),
                        "--budget-gib", "0.001", "--context", "512", "--concurrency", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cla-3" in r.stdout and "recommended" in r.stdout
    assert "--hf-overrides '{\"layer_types\": \"0_0_0_3_3_3\"}'" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "lckv_vllm.cli", "plan", str(model_dir("tiny-identity")),
                          "--budget-gib", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--context" in bad.stderr
