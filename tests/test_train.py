"""The training core (lckv_vllm/train.py) against the float64 reference, and that training steps learn."""

import random

import pytest
import torch

from conftest import random_prompt
from lckv_vllm.reference import ReferenceModel
from lckv_vllm.train import TrainableLCKV, cosine_lr, sample_routing, train_step


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


@pytest.mark.parametrize("preset", ["tiny-w2", "tiny-cla"])
def test_a_few_steps_lower_the_loss(model_dir, preset):
    torch.manual_seed(0)
    model = TrainableLCKV(model_dir(preset))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = torch.tensor([random_prompt(32, seed=310 + k) for k in range(2)])
    losses = [train_step(model, opt, batch) for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_cosine_schedule():
    assert cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 10, 1.0) == pytest.approx(0.1)


def test_train_into_w2_then_serve_equals_reference(model_dir, tmp_path, engine):
    """An identity checkpoint trained for a few steps into the w2 plan: the saved checkpoint (official format,
    consumers without k/v) loads in vLLM, and its greedy output equals the reference's on the same checkpoint."""
    from conftest import generate
    from lckv_vllm.train import train

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
