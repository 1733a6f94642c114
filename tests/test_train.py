"""The training core (lckv_vllm/tools/train.py) against the float64 reference, and that training steps learn."""

import math
import random

import pytest
import torch

from conftest import random_prompt
from lckv_vllm.reference_model import ReferenceModel
from lckv_vllm.tools.train import TrainableLCKV, cosine_lr, sample_routing, train_step


@pytest.mark.parametrize("preset", ["tiny-w2", "tiny-cla", "tiny-yoco", "tiny-w10", "tiny-lasagna"])
def test_forward_equals_reference_iterative(model_dir, preset):
    """m + b passes without gradient over a whole sequence = the reference's iterative encoding."""
    toks = random_prompt(24, seed=300)
    model = TrainableLCKV(model_dir(preset))
    with torch.no_grad():
        got = model(torch.tensor([toks, toks]))
    want = ReferenceModel(model_dir(preset)).forward_iterative(toks)
    assert torch.allclose(got[1].double(), want, rtol=1e-4, atol=1e-3 * want.abs().max().item())
    assert torch.equal(got[0], got[1])  # batch rows are independent


def test_routing_equals_reference_with_that_pattern(model_dir):
    routing = [0, 0, 1, 3, 3, 2]  # acyclic: every layer reads itself or a preceding layer
    toks = random_prompt(20, seed=301)
    model = TrainableLCKV(model_dir("tiny-identity"))
    with torch.no_grad():
        got = model(torch.tensor([toks]), routing=routing)[0]
    want = ReferenceModel(model_dir("tiny-identity"),
                          overrides={"layer_types": "_".join(map(str, routing))}).forward_iterative(toks)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-3 * want.abs().max().item())


def test_sample_routing_only_reads_preceding_layers():
    rng = random.Random(0)
    for _ in range(200):
        r = sample_routing(8, 0.5, rng)
        assert r[0] == 0 and all(j <= i for i, j in enumerate(r))
    assert sample_routing(8, 0.0, rng) == list(range(8))
    assert all(j < i for i, j in enumerate(sample_routing(8, 1.0, rng)) if i > 0)


def test_keep_every_routing_draws_only_the_deploy_patterns():
    """--route-rule keep-every: a routed step is one of cla-2/3/4 (each layer reads the nearest kept layer below),
    each drawn about equally often, and the identity in about 1 - p of the steps; unknown rules are refused."""
    from collections import Counter

    rng = random.Random(0)
    cla = {k: [i - i % k for i in range(6)] for k in (2, 3, 4)}
    seen = Counter(tuple(sample_routing(6, 0.75, rng, "keep-every")) for _ in range(4000))
    assert set(seen) == {tuple(range(6)), *map(tuple, cla.values())}
    assert abs(seen[tuple(range(6))] / 4000 - 0.25) < 0.03
    assert all(abs(seen[tuple(c)] / 4000 - 0.25) < 0.03 for c in cla.values())
    assert sample_routing(3, 1.0, rng, "keep-every") == [0, 0, 2]  # k < num_layers: only k = 2 fits 3 layers
    assert sample_routing(6, 0.0, rng, "keep-every") == list(range(6))
    with pytest.raises(ValueError, match="--route-rule: 'nearest'"):
        sample_routing(6, 0.5, rng, "nearest")


@pytest.mark.parametrize("preset", ["tiny-w2", "tiny-cla"])
def test_a_few_steps_lower_the_loss(model_dir, preset):
    torch.manual_seed(0)
    model = TrainableLCKV(model_dir(preset))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = torch.tensor([random_prompt(32, seed=310 + k) for k in range(2)])
    losses = [train_step(model, opt, batch) for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_cosine_schedule_warms_up_then_decays_to_floor():
    assert cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 10, 1.0) == pytest.approx(0.1)


def test_train_into_w2_then_serve_equals_reference(model_dir, tmp_path, engine):
    """An identity checkpoint trained for a few steps into the w2 plan: the saved checkpoint (official format,
    consumers without k/v) loads in vLLM, and its greedy output equals the reference's on the same checkpoint."""
    from conftest import generate
    from lckv_vllm.tools.train import train

    text = " ".join(f"line {i}: to be or not to be, that is the question." for i in range(120))
    report = train(model_dir("tiny-identity"), tmp_path / "w2", text, layer_types="0_4_4_4_4_5", steps=3, batch=2,
                   seq_len=32, lr=1e-3, warmup=1, eval_every=3, progress=False)
    assert report["layer_types"] == "0_4_4_4_4_5" and len(report["history"]) == 3
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.self_attn.k_proj.weight" not in keys and "model.layers.4.self_attn.k_proj.weight" in keys
    prompts = [random_prompt(n, seed=320 + n) for n in (1, 12)]
    results = generate(engine(str(tmp_path / "w2")), prompts, max_tokens=8)
    ref = ReferenceModel(tmp_path / "w2")
    for (toks, lps, _), p in zip(results, prompts):
        rtoks, rlps = ref.generate(p, 8)
        assert toks == rtoks and max(abs(a - b) for a, b in zip(lps, rlps)) < 1e-3


TEXT = " ".join(f"line {i}: to be or not to be, that is the question; whether 'tis nobler in the mind." for i in range(150))


def test_resume_equals_an_uninterrupted_run(model_dir, tmp_path):
    """Stopped after 2 of 4 steps and resumed from train_state.pt: the same weights and history, to the bit, as one
    uninterrupted run (AdamW state, step, and the data/routing RNG all restored)."""
    from lckv_vllm.tools.train import train

    kw = dict(layer_types="0_4_4_4_4_5", steps=4, batch=2, seq_len=32, lr=1e-3, warmup=1, eval_every=2,
              progress=False)
    whole = train(model_dir("tiny-identity"), tmp_path / "whole", TEXT, **kw)
    part = train(model_dir("tiny-identity"), tmp_path / "parts", TEXT, stop_after=2, **kw)
    assert part["completed_steps"] == 2 and (tmp_path / "parts" / "train_state.pt").exists()
    rest = train(model_dir("tiny-identity"), tmp_path / "parts", TEXT, resume=True, **kw)
    assert rest["resumed_from_step"] == 2 and rest["completed_steps"] == 4
    assert rest["history"] == whole["history"]
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "parts" / "model.safetensors").read_bytes()
    assert not (tmp_path / "whole" / "train_state.pt").exists()  # no --save-every, not stopped early: no state file


def test_resume_refuses_changed_hyperparameters(model_dir, tmp_path):
    from lckv_vllm.tools.train import train

    kw = dict(steps=3, batch=2, seq_len=32, warmup=1, progress=False)
    train(model_dir("tiny-identity"), tmp_path / "o", TEXT, stop_after=1, **kw)
    with pytest.raises(ValueError, match="--resume: batch was 2, now 3"):
        train(model_dir("tiny-identity"), tmp_path / "o", TEXT, resume=True, **dict(kw, batch=3))
    with pytest.raises(ValueError, match="--resume: route_prob was 0.0, now 0.5, route_rule was 'uniform', now "
                                         "'keep-every'"):
        train(model_dir("tiny-identity"), tmp_path / "o", TEXT, resume=True,
              **dict(kw, route_prob=0.5, route_rule="keep-every"))
    with pytest.raises(ValueError, match="--resume: .* does not exist"):
        train(model_dir("tiny-identity"), tmp_path / "none", TEXT, resume=True, **kw)


def test_random_routing_needs_an_identity_plan(model_dir, tmp_path):
    from lckv_vllm.tools.train import train

    with pytest.raises(ValueError, match="--route-prob"):
        train(model_dir("tiny-w2"), tmp_path / "o", TEXT, route_prob=0.5, steps=1, batch=1, seq_len=16,
              progress=False)


@pytest.mark.parametrize("rule", ["uniform", "keep-every"])
def test_routed_training_sees_only_acyclic_routings(model_dir, tmp_path, monkeypatch, rule):
    """Every routing the loop trains with reads the layer itself or a preceding one, and some read another layer."""
    import lckv_vllm.tools.train as tr

    seen = []
    real = tr.train_step

    def spy(model, opt, tokens, routing=None):
        seen.append(routing)
        return real(model, opt, tokens, routing)

    monkeypatch.setattr(tr, "train_step", spy)
    rep = tr.train(model_dir("tiny-identity"), tmp_path / "o", TEXT, route_prob=0.5, route_rule=rule, steps=6,
                   batch=1, seq_len=16, warmup=1, progress=False)
    assert rep["route_rule"] == rule
    assert len(seen) == 6 and all(r[0] == 0 and all(j <= i for i, j in enumerate(r)) for r in seen)
    assert any(j < i for r in seen for i, j in enumerate(r))


def test_tokenizer_and_training_init(tmp_path):
    """make-tokenizer: a byte-level BPE that AutoTokenizer (and so vLLM) loads, BOS first, lossless on any text;
    make-model --tokenizer --init-std: vocab from it, weights at the training scale."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lckv_vllm.tools.checkpoint import ModelSpec, make_model
    from lckv_vllm.tools.tokenizer import train_tokenizer

    assert train_tokenizer(TEXT * 3, 400, tmp_path / "tok") == 400
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = tok.encode("to be or not to be — é ü 漢")
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2 and len(tok) == 400
    assert tok.decode(ids, skip_special_tokens=True) == "to be or not to be — é ü 漢"
    assert len(tok.encode("to be or not to be")) < len("to be or not to be") // 2  # merges learned
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXT, 100, tmp_path / "bad")
    out = make_model(ModelSpec(layer_types="0_1_2_3", num_layers=4, hidden_size=64, tokenizer=str(tmp_path / "tok"),
                               init_std=0.02, tie_word_embeddings=True), tmp_path / "m")
    import json

    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.embed_tokens.weight"].shape == (400, 64)
    assert abs(sd["model.embed_tokens.weight"].std().item() - 0.02) < 0.003
    assert torch.equal(sd["model.norm.weight"], torch.ones(64))


def test_training_into_a_plan_without_the_producers_weights_is_refused(model_dir):
    from lckv_vllm.plan import LayerPlan

    with pytest.raises(ValueError, match=r"layers \[1, 2, 3\] compute KV"):
        TrainableLCKV(model_dir("tiny-w2"), LayerPlan.parse("0_1_2_3_4_5", 6))


@pytest.mark.parametrize("name", ["shakespeare-lckv-w2", "shakespeare-identity"])
def test_committed_trained_models_serve_as_the_reference_says(engine, name):
    """The trained models of `make demo` (examples/, bf16 weights served in float32): vLLM's greedy tokens equal the
    reference's, and they are trained (a low perplexity on Shakespeare through vLLM)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from conftest import generate
    from lckv_vllm import register

    register()  # AutoTokenizer reads config.json: model_type "lckv-llama" must be known
    path = Path(__file__).resolve().parent.parent / "examples" / name
    tok = AutoTokenizer.from_pretrained(str(path))
    prompts = [tok.encode(p) for p in ("KING.\nMy lords, ", "ROMEO.\nO, ")]
    results = generate(engine(str(path)), prompts, max_tokens=12)
    ref = ReferenceModel(path)
    for (toks, lps, _), p in zip(results, prompts):
        rtoks, rlps = ref.generate(p, 12)
        assert toks == rtoks and max(abs(a - b) for a, b in zip(lps, rlps)) < 1e-3
    # trained, not random: a Shakespeare passage scores far below the ~4,096 perplexity of an untrained model
    from lckv_vllm.tools.deploy import prompt_nll

    passage = (Path(__file__).resolve().parent.parent / "benchmarks/results/shakespeare_heldout.txt").read_text()
    nll, n = prompt_nll(engine(str(path)), [tok.encode(passage)[:256]])
    assert math.exp(nll / n) < 500


def test_fine_tune_an_imported_llama_into_lckv(model_dir, tmp_path):
    """The fine-tuning path of a real model (e.g. SmolLM2): a plain Llama checkpoint imported with a w2 plan (its
    consumers' k/v dropped) trains, its loss falls, and the result keeps the official format."""
    import json

    from lckv_vllm.tools.checkpoint import export_llama, import_llama
    from lckv_vllm.tools.train import train

    llama = export_llama(model_dir("tiny-identity"), tmp_path / "llama")
    lckv = import_llama(llama, tmp_path / "lckv", "0_4_4_4_4_5")
    report = train(lckv, tmp_path / "ft", TEXT, steps=8, batch=2, seq_len=32, lr=3e-3, warmup=1, eval_every=8,
                   progress=False)
    assert report["layer_types"] == "0_4_4_4_4_5" and report["history"][-1]["loss"] < report["history"][0]["loss"]
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["model_type"] == "lckv-llama" and cfg["layer_types"] == "0_4_4_4_4_5"
    TrainableLCKV(tmp_path / "ft")  # loads back: producers have k/v, consumers none
