"""LoRA adapters on LCKV plans (lckv_vllm/engine/lora.py): a served adapter equals the checkpoint with the adapter
merged into its weights (the float64 reference of the merged checkpoint), with several adapters and requests without
one in the same batch.

The prompts straddle the plans' pass count (m+b = 9) and prefill block, so the cyclic segment's later passes, blocks
and split passes run on row subsets of the step, where each token must keep its own adapter.  Two adapter slots
(`max_loras=2`) with both adapters in the batch: a request without an adapter would read the last slot's adapter
through vLLM's CPU ops without vllm_patches item 9.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import random_prompt
from server_utils import StubEngine, lckv_serve, server_env
from lckv_vllm.reference_model import ReferenceModel
from lckv_vllm.tools.lora import make_adapter, merge_adapter

MAX_DLOGPROB = 1e-3
LORA = dict(enable_lora=True, max_lora_rank=8, max_loras=2)
LENGTHS = (1, 9, 30, 70)
W2 = {"layer_types": "0_4_4_4_4_5"}
# (checkpoint, deploy-time override): cyclic, acyclic, identity, windowed pages, and an identity checkpoint served
# as LCKV w2 (its adapter's k/v for the layers that stop computing KV have nothing to apply to)
CASES = [("tiny-w2", None), ("tiny-cla", None), ("tiny-identity", None), ("tiny-yoco", None), ("tiny-identity", W2)]


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """preset -> (checkpoint, [(adapter dir, merged checkpoint)] for two adapters): one on every module, one on a
    few."""
    root = tmp_path_factory.mktemp("lora")
    built: dict = {}

    def get(preset: str):
        if preset not in built:
            base = model_dir(preset)
            made = [make_adapter(base, root / preset / "a1", seed=1),
                    make_adapter(base, root / preset / "a2", seed=2, targets=("q_proj", "v_proj", "down_proj"))]
            built[preset] = base, [(a, merge_adapter(base, a, root / preset / f"merged-{a.name}")) for a in made]
        return built[preset]

    return get


def _generate(llm, prompts, loras, max_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, lora_request=loras, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                             o.outputs[0].token_ids)]) for o in outs]


@pytest.mark.parametrize("preset,override", CASES, ids=[p + ("-as-w2" if o else "") for p, o in CASES])
def test_adapters_equal_their_merged_checkpoints(engine, adapters, preset, override):
    from vllm.lora.request import LoRARequest

    base, pairs = adapters(preset)
    llm = engine(preset, **LORA, **({"hf_overrides": override} if override else {}))
    requests = [None] + [LoRARequest(f"a{i + 1}", i + 1, str(a)) for i, (a, _) in enumerate(pairs)]
    refs = [ReferenceModel(m, overrides=override) for m in [base] + [merged for _, merged in pairs]]
    prompts, loras, which = [], [], []
    for n in LENGTHS:  # every prompt under every adapter (and none), all in one batch
        for k, req in enumerate(requests):
            prompts.append(random_prompt(n, seed=40 + n))
            loras.append(req)
            which.append(k)
    results = _generate(llm, prompts, loras, max_tokens=12)
    worst, differs = 0.0, set()
    for p, k, (toks, lps) in zip(prompts, which, results):
        rtoks, rlps = refs[k].generate(p, 12)
        assert toks == rtoks, (len(p), k)
        worst = max(worst, max(abs(a - b) for a, b in zip(lps, rlps)))
        if k and toks != refs[0].generate(p, 12)[0]:
            differs.add(k)
    assert worst < MAX_DLOGPROB, worst
    assert differs == {1, 2}, differs  # each adapter changes some greedy output: the check can fail


# ---- lckv-serve: adapters as model names of their own (--lora-modules) ------------------------------------------------


def test_lckv_serve_answers_with_the_named_adapter(adapters, tokenizer, tmp_path):
    """Over HTTP: a completion naming the adapter equals the merged checkpoint's reference, the base name the base."""
    base, [(a1, merged), _] = adapters("tiny-w2")
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes",
            str(32 << 20), "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"style={a1}"]
    server = lckv_serve(base, tmp_path / "server.log", "base", args, server_env())
    srv = next(server)
    try:
        models = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("base", None), ("style", "base")]
        prompt = random_prompt(30, seed=5)
        for name, checkpoint in (("style", merged), ("base", base)):
            r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
                "model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            ref_toks, ref_lps = ReferenceModel(checkpoint).generate(prompt, 8)
            got = choice["logprobs"]["token_logprobs"]
            assert choice["text"] == tokenizer.decode(ref_toks), name
            assert max(abs(a - b) for a, b in zip(got, ref_lps)) < MAX_DLOGPROB, (name, got, ref_lps)
    finally:
        next(server, None)


def test_adapter_names_route_requests(tokenizer, tmp_path):
    """In-process (stand-in engine): each adapter is listed and routed; other names are a 404 naming all."""
    from lckv_vllm.server.app import create_app
    from lckv_vllm.server.engine import EngineFrontend

    async def run():
        engine = StubEngine(tokenizer)
        fe = EngineFrontend(engine, served_model_names=["m"], model_path="stub",
                            lora_modules={"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(fe)), base_url="http://t") as c:
            cards = (await c.get("/v1/models")).json()["data"]
            assert [(m["id"], m["root"], m["parent"]) for m in cards] == [
                ("m", "stub", None), ("a", str(tmp_path / "a"), "m"), ("b", str(tmp_path / "b"), "m")]
            for name in ("a", "m", "b"):
                r = await c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1})
                assert r.status_code == 200, r.text
            r = await c.post("/v1/chat/completions", json={"model": "b", "max_tokens": 1,
                                                           "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            r = await c.post("/v1/completions", json={"model": "c", "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 404 and "'m', 'a', 'b'" in r.json()["error"]["message"]
        assert engine.loras == ["a", None, "b", "b"]
        fe.shutdown()

    asyncio.run(run())


@pytest.mark.parametrize("args,message", [
    (["--lora-modules", "a=/x"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "a"], "'a' is not NAME=PATH"),
    (["--enable-lora", "--lora-modules", "a=/nowhere"], "'/nowhere' (for 'a') has no adapter_config.json"),
])
def test_bad_lora_modules_stop_start_up_with_a_message(args, message, capsys):
    from lckv_vllm.server.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["model", *args])
    assert message in capsys.readouterr().err
