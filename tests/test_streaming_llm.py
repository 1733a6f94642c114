"""StreamingLLM mode (`lckv_streaming`): every producer keeps `sink_tokens` + the last `window` tokens, keys are
stored unrotated and rotated at their cache positions when read.

Oracles: the float64 reference's streaming semantics (greedy tokens equal, |dlogprob| < 1e-3), itself checked against
plain attention (a window covering everything) and against a sliding-window plan (no sinks: pos-shift changes no
distance); the same engine with full pages (`LCKV_WINDOWED_PAGES=0`: same reads, nothing freed); the blocks a
streaming sequence holds, read from vLLM's KV cache manager after every step.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import BLOCK_SIZE, generate, random_prompt, stream_watching_blocks
from lckv_vllm.plan import LayerPlan, LayerPlanError, plan_from_config
from lckv_vllm.reference_model import ReferenceModel
from lckv_vllm.streaming_spec import Streaming, StreamingError, parse
from lckv_vllm.tools.checkpoint import make_preset

SINKS, WINDOW = 4, 20  # neither a multiple of the block size (16): sinks and window share blocks with the gap
STREAM = {"sink_tokens": SINKS, "window": WINDOW}
PLANS = {"w2": "tiny-w2", "cla": "tiny-cla", "identity": "tiny-identity"}
LENGTHS = (3, 30, 70)
GEN = 40
MAX_DLOGPROB = 1e-3


def with_streaming(path, streaming=STREAM):
    cfg = json.loads((path / "config.json").read_text())
    cfg["lckv_streaming"] = streaming
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


@pytest.fixture(scope="module")
def stream_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return {name: with_streaming(make_preset(preset, root / name)) for name, preset in PLANS.items()}


# ---- configuration --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, field", [
    ({"sink_tokens": 4}, "lckv_streaming.window: missing"),
    ({"sink_tokens": -1, "window": 8}, "lckv_streaming.sink_tokens: expected an integer >= 0"),
    ({"sink_tokens": 4, "window": 0}, "lckv_streaming.window: expected an integer >= 1"),
    ({"sink_tokens": 4, "window": 8.5}, "lckv_streaming.window: expected an integer"),
    ({"sink_tokens": True, "window": 8}, "lckv_streaming.sink_tokens"),
    ({"sink_tokens": 4, "window": 8, "sinks": 2}, "unknown key.*'sinks'"),
    ([4, 8], "lckv_streaming: expected an object"),
    ({"sink_tokens": 64, "window": 4040}, "exceeds max_position_embeddings = 4096"),
])
def test_bad_streaming_config_names_the_field(raw, field):
    with pytest.raises(StreamingError, match=field):
        parse(raw, max_position_embeddings=4096)


def test_streaming_rejects_what_it_cannot_serve():
    from types import SimpleNamespace

    base = dict(num_hidden_layers=3, lckv_layer_types="0_2_2", max_position_embeddings=256, lckv_streaming=STREAM)
    assert plan_from_config(SimpleNamespace(**base)).streaming == Streaming(SINKS, WINDOW)
    with pytest.raises(LayerPlanError, match="lckv_streaming: layer_types entry 0 .*sliding-window"):
        plan_from_config(SimpleNamespace(**{**base, "lckv_layer_types": "0s_2_2", "sliding_window": 8}))
    with pytest.raises(LayerPlanError, match="rope_type is 'llama3'"):
        plan_from_config(SimpleNamespace(**base, rope_parameters={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(LayerPlanError, match="exceeds max_position_embeddings"):
        plan_from_config(SimpleNamespace(**{**base, "max_position_embeddings": 16}))
    # every producer gets sink + window pages, whoever reads it
    plan = LayerPlan.parse("0_2_2", 3, streaming=Streaming(SINKS, WINDOW))
    assert [plan.page_window(p) for p in plan.producers] == [WINDOW, WINDOW]
    assert plan.kv_tokens_per_sequence() == SINKS + WINDOW and plan.kv_tokens_per_sequence(False) is None
    assert LayerPlan.parse("0s_1s", 2, sliding_window=8).kv_tokens_per_sequence() == 8
    assert LayerPlan.parse("0s_1s_1", 3, sliding_window=8).kv_tokens_per_sequence() is None  # layer 1 read in full


def test_visibility_and_shift():
    s = Streaming(2, 4)
    assert [j for j in range(10) if s.visible(9, j, strict=False)] == [0, 1, 6, 7, 8, 9]
    assert [j for j in range(10) if s.visible(9, j, strict=True)] == [0, 1, 6, 7, 8]
    assert [s.shift(t) for t in (0, 5, 6, 9)] == [0, 0, 1, 4]  # cache positions 0..5: the query at 5 once shifted
    assert s.kept_from(9) == 6 and s.kept_from(3) == 2


# ---- the reference --------------------------------------------------------------------------------------------------
def test_reference_streaming_is_plain_attention_while_everything_fits(model_dir):
    """Sinks + window covering the whole sequence: no key is dropped and no position moves."""
    path = model_dir("tiny-w2")
    tokens = random_prompt(40, seed=3)
    plain = ReferenceModel(path).forward_sequential(tokens)
    streamed = ReferenceModel(path, overrides={"lckv_streaming": {"sink_tokens": 4, "window": 40}})
    assert (plain - streamed.forward_sequential(tokens)).abs().max() < 1e-9


def test_reference_streaming_without_sinks_is_sliding_window(model_dir):
    """No sinks: the window keys are rotated at j - shift against the query at t - shift, the same distances as a
    sliding-window layer reading rotated keys; so an identity plan streams exactly as its all-sliding twin."""
    path = model_dir("tiny-identity")
    tokens = random_prompt(50, seed=4)
    swa = ReferenceModel(path, overrides={"layer_types": "_".join(f"{i}s" for i in range(6)), "sliding_window": 8})
    streamed = ReferenceModel(path, overrides={"lckv_streaming": {"sink_tokens": 0, "window": 8}})
    a, b = swa.forward_sequential(tokens), streamed.forward_sequential(tokens)
    assert (a - b).abs().max() < 1e-9
    # and sinks matter: the same window with 4 sinks differs once the window alone would drop position 0
    sinks = ReferenceModel(path, overrides={"lckv_streaming": {"sink_tokens": 4, "window": 8}})
    c = sinks.forward_sequential(tokens)
    assert (a[:8] - c[:8]).abs().max() < 1e-9 and (a[8:] - c[8:]).abs().max() > 1e-3


# ---- vLLM against the reference ------------------------------------------------------------------------------------
def _kinds(llm):
    return [type(g.kv_cache_spec).__name__ for g in llm.llm_engine.engine_core.engine_core.scheduler
            .kv_cache_config.kv_cache_groups]


@pytest.mark.parametrize("name", list(PLANS))
def test_streaming_matches_reference(engine, stream_dirs, name):
    path = stream_dirs[name]
    llm = engine(str(path))
    assert set(_kinds(llm)) == {"SinkWindowSpec"}
    prompts = [random_prompt(n, seed=700 + n) for n in LENGTHS]
    got = generate(llm, prompts, max_tokens=GEN)
    ref = ReferenceModel(path)
    worst = 0.0
    for (toks, lps, _), p in zip(got, prompts):
        rtoks, rlps = ref.generate(p, GEN)
        assert toks == rtoks
        worst = max(worst, max(abs(a - b) for a, b in zip(lps, rlps)))
    assert worst < MAX_DLOGPROB, worst
    if name == "w2":  # full pages, same reads: the same outputs (nothing the reads need was freed)
        full = engine(str(path), env={"LCKV_WINDOWED_PAGES": "0"})
        assert _kinds(full) == ["FullAttentionSpec"]
        for (toks, lps, _), (ftoks, flps, _) in zip(got, generate(full, prompts, max_tokens=GEN)):
            assert toks == ftoks and max(abs(a - b) for a, b in zip(lps, flps)) < 1e-4


@pytest.mark.parametrize("name", ["w2", "cla"])
def test_streaming_chunked_prefill_matches_chunk_by_chunk_reference(engine, stream_dirs, name):
    """A 100-token prompt split into 32-token chunks, the window sliding within and across chunks."""
    path = stream_dirs[name]
    llm = engine(str(path), enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=8)
    long = random_prompt(100, seed=71)
    toks, lps, _ = generate(llm, [long], max_tokens=24)[0]
    rtoks, rlps = ReferenceModel(path).generate(long, 24, chunk_sizes=[32, 32, 32, 4])
    assert toks == rtoks
    assert max(abs(a - b) for a, b in zip(lps, rlps)) < MAX_DLOGPROB


def test_streaming_sequence_holds_sinks_and_a_window_of_blocks(engine, stream_dirs):
    """A sequence streaming 10x the window: every group holds at most ceil(S/block) + ceil(W/block) + 1 blocks after
    every step, nothing is preempted, and the generated tokens equal the reference's."""
    path = stream_dirs["w2"]
    llm = engine(str(path))
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    bound = math.ceil(SINKS / BLOCK_SIZE) + math.ceil(WINDOW / BLOCK_SIZE) + 1
    prompt, n_gen = random_prompt(10, seed=9), 10 * WINDOW

    def sink_kept(group, blocks):
        assert not blocks[0].is_null  # the sink block is never freed

    finished, most, preemptions = stream_watching_blocks(llm, prompt, n_gen, sink_kept)
    assert all(1 <= held <= bound for held in most), (most, bound)
    assert preemptions == 0
    toks = list(finished.outputs[0].token_ids)
    rtoks, _ = ReferenceModel(path).generate(prompt, n_gen)
    assert toks == rtoks
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == sched.kv_cache_config.num_blocks - 1


def test_streaming_runs_past_the_trained_context(engine, tmp_path):
    """max_position_embeddings 64, a 300-token stream (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, --max-model-len 512): every
    rotary angle stays within sinks + window, and the tokens equal the reference's."""
    path = with_streaming(make_preset("tiny-cla", tmp_path / "short", max_position_embeddings=64))
    llm = engine(str(path), env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}, max_model_len=512)
    prompt = random_prompt(20, seed=11)
    toks, lps, _ = generate(llm, [prompt], max_tokens=280)[0]
    rtoks, rlps = ReferenceModel(path).generate(prompt, 280)
    assert toks == rtoks and len(toks) == 280
    assert max(abs(a - b) for a, b in zip(lps, rlps)) < MAX_DLOGPROB


def test_streaming_recompute_after_preemption_is_exact(engine, stream_dirs):
    """A KV cache far too small for the batch: preempted streaming requests are re-encoded exactly (whole-prompt
    mode, tolerance 0), their sink + window reads unchanged by the re-encoding."""
    from test_preemption import N_REQ, PROMPT, WHOLE_PROMPT_EXACT, run

    prompts = [random_prompt(PROMPT, seed=800 + i) for i in range(N_REQ)]
    r = run(engine, None, stream_dirs["w2"], env=WHOLE_PROMPT_EXACT, prompts=prompts)
    assert r["preemptions"] > 0, r
    assert r["differ"] == 0 and r["worst"] < 1e-3, r


def test_streaming_refuses_what_it_cannot_serve_at_load(engine, stream_dirs, tmp_path):
    from vllm import LLM

    sliding = make_preset("tiny-identity", tmp_path / "swa", layer_types="0s_1s_2s_3s_4s_5s", sliding_window=8)
    with pytest.raises(Exception, match="lckv_streaming: layer_types entry 0"):
        LLM(str(with_streaming(sliding)), dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=128,
            enforce_eager=True)
    from lckv_vllm.tools.env import temporary_env

    with temporary_env({"LCKV_ATTENTION_IMPL": "cpu"}), pytest.raises(Exception, match="LCKV_ATTENTION_IMPL=cpu.*lckv_streaming"):
        LLM(str(stream_dirs["identity"]), dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=128,
            enforce_eager=True)
