"""vLLM with the plugin against the pure-torch reference (and against vLLM's own Llama).

Every configuration serves one mixed batch (prompts of 1 token, <= m+b tokens and > m+b tokens) and must produce the
reference's greedy tokens with |Δ logprob| < 1e-3 over 16 decoded tokens."""

import json

import pytest

from conftest import BLOCK_SIZE, generate, generate_staggered, model_of, random_prompt
from lckv_vllm.tools.checkpoint import export_llama
from lckv_vllm.reference_model import ReferenceModel

CONFIGS = ["tiny-w2", "tiny-w10", "tiny-sandwich", "tiny-cla", "tiny-yoco", "tiny-identity", "tiny-lasagna"]
LENGTHS = (1, 5, 9, 30, 70)  # m+b = 9
MAX_DLOGPROB = 1e-3
_refs = {}


def reference(model_dir, preset):
    if preset not in _refs:
        _refs[preset] = ReferenceModel(model_dir(preset))
    return _refs[preset]


def check_against_reference(results, ref_runs):
    worst = 0.0
    for (toks, lps, _), (rtoks, rlps) in zip(results, ref_runs):
        assert toks == rtoks
        worst = max(worst, max(abs(a - b) for a, b in zip(lps, rlps)))
    assert worst < MAX_DLOGPROB, worst
    return worst


# The default attention path on CPU is vLLM's C++ kernels made strict ("cpu"); the portable torch path runs the
# configurations whose plans exercise the most distinct read patterns.
CASES = [(p, "auto") for p in CONFIGS] + [(p, "torch") for p in ("tiny-w2", "tiny-yoco", "tiny-lasagna")]


@pytest.mark.parametrize("preset,impl", CASES)
def test_mixed_batch_matches_reference(engine, model_dir, preset, impl, record_property):
    prompts = [random_prompt(n, seed=10 + n) for n in LENGTHS]
    llm = engine(preset) if impl == "auto" else engine(preset, env={"LCKV_ATTENTION_IMPL": impl})
    expected = "cpu" if impl == "auto" else impl
    assert {layer.self_attn.path.name for layer in model_of(llm).model.layers} == {expected}
    results = generate(llm, prompts, max_tokens=16)
    ref = reference(model_dir, preset)
    worst = check_against_reference(results, [ref.generate(p, 16) for p in prompts])
    record_property("max_dlogprob", worst)
    print(f"{preset} ({expected}): max |dlogprob| = {worst:.2e}")


def test_compiled_mode_matches_reference(engine, model_dir):
    """vLLM's torch.compile (the CPU default) compiles each segment between the LCKV attention ops; the pass loop
    stays eager.  Same oracle, same tolerance."""
    from vllm.config.compilation import CompilationMode

    llm = engine("tiny-w2", enforce_eager=False)
    assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE  # CPU: DYNAMO_TRACE_ONCE
    # adaptive prefill's split units were compiled by vLLM's warm-up, not left for the first prefill to compile
    units = [u for s in model_of(llm).model.segments if s.split is not None for u in s.split.units()]
    assert units and all(u.compiled for u in units)
    prompts = [random_prompt(n, seed=80 + n) for n in LENGTHS]
    ref = reference(model_dir, "tiny-w2")
    check_against_reference(generate(llm, prompts), [ref.generate(p, 16) for p in prompts])


WHOLE_PROMPT_EXACT = {"LCKV_CHUNKED_PREFILL": "0", "LCKV_PREFILL_TOL": "0"}  # the pre-adaptive behaviour


def test_cyclic_default_is_chunked_with_prefix_caching(engine):
    llm = engine("tiny-w2")
    cfg = llm.llm_engine.vllm_config
    assert cfg.scheduler_config.enable_chunked_prefill
    assert cfg.cache_config.enable_prefix_caching
    settings = model_of(llm).model.settings
    assert settings.chunked_prefill and settings.adaptive and settings.prefill_tol > 0
    whole = engine("tiny-w2", env=WHOLE_PROMPT_EXACT).llm_engine.vllm_config
    assert not whole.scheduler_config.enable_chunked_prefill and not whole.cache_config.enable_prefix_caching


def test_whole_prompt_switch_is_independent_of_batch_and_history(engine, model_dir):
    """`LCKV_CHUNKED_PREFILL=0 LCKV_PREFILL_TOL=0` reproduces the pre-adaptive outputs (whole prompt, m+b passes): a
    long prompt's output is the same alone, in a batch, with a tiny token budget, and when seen again."""
    long = random_prompt(100, seed=21)
    others = [random_prompt(n, seed=30 + n) for n in (3, 17, 60)]
    llm = engine("tiny-w2", env=WHOLE_PROMPT_EXACT)
    alone = generate(llm, [long])[0]
    batched = generate(llm, others + [long] + others)[3]
    again = generate(llm, [long])[0]
    # asking for a 32-token budget does not split the prompt: the plugin keeps whole-prompt prefill
    small = generate(engine("tiny-w2", env=WHOLE_PROMPT_EXACT, max_num_batched_tokens=32, max_num_seqs=8), [long])[0]
    ref_toks, ref_lps = reference(model_dir, "tiny-w2").generate(long, 16, tol=0)
    for toks, lps, _ in (alone, batched, again, small):
        assert toks == ref_toks
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < MAX_DLOGPROB
    assert again[2] == 0  # no prefix-cache reuse


def test_tolerance_zero_is_the_m_plus_b_result(engine, model_dir):
    """Adaptive passes with tolerance 0 run min(m+b, length) passes: token for token the m+b-pass result, under the
    default chunked mode too (prompts here fit one step)."""
    prompts = [random_prompt(n, seed=110 + n) for n in LENGTHS]
    llm = engine("tiny-w2", env={"LCKV_PREFILL_TOL": "0"})
    assert not model_of(llm).model.settings.adaptive
    ref = reference(model_dir, "tiny-w2")
    check_against_reference(generate(llm, prompts), [ref.generate(p, 16, tol=0) for p in prompts])
    hist = model_of(llm).model.prefill.stats.snapshot()["passes"]
    # prompts of 9, 30 and 70 tokens used m+b = 9 passes, the 5-token one its length; the 1-token one is no prefill
    assert hist[9] == 3 and hist[5] == 1 and sum(hist) == 4, hist


@pytest.mark.parametrize("preset", ["tiny-cla", "tiny-yoco", "tiny-identity"])
def test_acyclic_chunked_prefill_and_prefix_cache_are_exact(engine, model_dir, preset):
    long = random_prompt(150, seed=40)
    llm = engine(preset, enable_chunked_prefill=True, enable_prefix_caching=True, max_num_batched_tokens=32,
                 max_num_seqs=8)
    cfg = llm.llm_engine.vllm_config
    assert cfg.scheduler_config.enable_chunked_prefill and cfg.cache_config.enable_prefix_caching
    first = generate(llm, [long])[0]
    second = generate(llm, [long])[0]
    assert second[2] >= BLOCK_SIZE  # the second run really hit the prefix cache
    plain = generate(engine(preset), [long])[0]
    ref_toks, ref_lps = reference(model_dir, preset).generate(long, 16)
    for toks, lps, _ in (first, second, plain):
        assert toks == ref_toks
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < MAX_DLOGPROB


def test_cyclic_chunked_matches_chunk_by_chunk_reference(engine, model_dir):
    """The default for cyclic plans: a prompt the scheduler splits is encoded chunk by chunk (adaptive passes)."""
    long = random_prompt(100, seed=50)
    llm = engine("tiny-w2", enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=8,
                 enable_prefix_caching=False)
    assert llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
    toks, lps, _ = generate(llm, [long])[0]
    ref = reference(model_dir, "tiny-w2")
    chunked_toks, chunked_lps = ref.generate(long, 16, chunk_sizes=[32, 32, 32, 4])
    whole_toks, whole_lps = ref.generate(long, 16)
    assert toks == chunked_toks
    assert max(abs(a - b) for a, b in zip(lps, chunked_lps)) < MAX_DLOGPROB
    # the test can tell the two encodings apart: chunk-by-chunk really differs from whole-prompt here
    assert chunked_toks != whole_toks or max(abs(a - b) for a, b in zip(chunked_lps, whole_lps)) > 1e-2


def test_cyclic_prefix_cache_hit_matches_reference_split_at_the_hit(engine, model_dir):
    """A prompt that shares a prefix with an earlier one reads the cached blocks as they are and encodes the rest as a
    chunk on top: the reference's chunk-by-chunk encoding split at the hit boundary.  The prefix's K/V does not
    depend on what followed it in the earlier prompt (strict causality; the adaptive stop is causal too)."""
    llm = engine("tiny-w2", max_num_seqs=8)
    first = random_prompt(100, seed=55)
    second = first[:70] + random_prompt(30, seed=56)
    generate(llm, [first], max_tokens=2)
    toks, lps, hit = generate(llm, [second])[0]
    assert hit == 64  # the four full 16-token blocks of the shared 70 tokens
    ref = reference(model_dir, "tiny-w2")
    rtoks, rlps = ref.generate(second, 16, chunk_sizes=[hit, len(second) - hit])
    assert toks == rtoks
    assert max(abs(a - b) for a, b in zip(lps, rlps)) < MAX_DLOGPROB
    whole_toks, whole_lps = ref.generate(second, 16)  # and the split is visible on this random model
    assert whole_toks != rtoks or max(abs(a - b) for a, b in zip(whole_lps, rlps)) > 1e-2


def test_identity_plan_matches_vllm_llama(engine, model_dir, tmp_path):
    llama_dir = export_llama(model_dir("tiny-identity"), tmp_path / "llama")
    assert json.loads((llama_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    prompts = [random_prompt(n, seed=60 + n) for n in LENGTHS]
    ours = generate(engine("tiny-identity"), prompts)
    theirs = generate(engine(str(llama_dir), block_size=32), prompts)
    assert type(model_of(engine(str(llama_dir), block_size=32))).__name__ == "LlamaForCausalLM"
    for (t1, l1, _), (t2, l2, _) in zip(ours, theirs):
        assert t1 == t2
        assert max(abs(a - b) for a, b in zip(l1, l2)) < MAX_DLOGPROB


def _kv_tokens(llm):
    cfg = llm.llm_engine.vllm_config.cache_config
    return cfg.num_gpu_blocks * cfg.block_size


def test_capacity_ratio_is_layers_over_producers(engine):
    budget = 48 << 20
    w2 = engine("tiny-w2", kv_cache_memory_bytes=budget)
    ident = engine("tiny-identity", kv_cache_memory_bytes=budget)
    plan = model_of(w2).plan
    ratio = plan.num_layers / len(plan.producers)
    assert ratio == 2.0
    assert abs(_kv_tokens(w2) - ratio * _kv_tokens(ident)) <= ratio * BLOCK_SIZE
    # bytes per token: producers x 2 x kv_heads x head_dim x 4 (fp32), nothing for consumers, no padding
    per_token = budget / _kv_tokens(w2)
    assert abs(per_token - len(plan.producers) * 2 * 2 * 32 * 4) / per_token < 0.01


def _bad_checkpoint(model_dir, tmp_path, name, edit_config=None, drop=None):
    import shutil

    from safetensors.torch import load_file, save_file

    src = model_dir("tiny-w2")
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        sd = load_file(str(dst / "model.safetensors"))
        del sd[drop]
        save_file(sd, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "case, message",
    [
        ("count", "has 5 entries but num_hidden_layers is 6"),
        ("range", "entry 2 is '9', but there are only 6 layers"),
        ("no_k", "layer 4 computes KV"),
    ],
)
def test_bad_checkpoint_fails_at_load_with_a_clear_message(model_dir, tmp_path, case, message):
    from vllm import LLM

    if case == "count":
        path = _bad_checkpoint(model_dir, tmp_path, case, lambda c: c.update(layer_types="0_4_4_4_5"))
    elif case == "range":
        path = _bad_checkpoint(model_dir, tmp_path, case, lambda c: c.update(layer_types="0_4_9_4_4_5"))
    else:
        path = _bad_checkpoint(model_dir, tmp_path, case, drop="model.layers.4.self_attn.k_proj.weight")
    with pytest.raises(Exception) as e:
        LLM(str(path), dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=128, block_size=16)
    text = str(e.value) + "".join(str(a) for a in getattr(e.value, "args", ()))
    cause = e.value.__cause__ or e.value.__context__
    while cause is not None:
        text += str(cause)
        cause = cause.__cause__ or cause.__context__
    assert message in text, text[:2000]


def test_tied_embeddings_checkpoint_matches_reference(engine, tmp_path):
    from lckv_vllm.tools.checkpoint import make_preset

    path = make_preset("tiny-w2", tmp_path / "tied", tie_word_embeddings=True, seed=7)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    prompts = [random_prompt(n, seed=70 + n) for n in (1, 12)]
    results = generate(engine(str(path)), prompts, max_tokens=8)
    ref = ReferenceModel(path)
    check_against_reference(results, [ref.generate(p, 8) for p in prompts])


def test_use_sequential_encodes_token_by_token(engine, model_dir, tmp_path):
    """`use_sequential: true` (official config field): the prefill runs one pass per token of the longest prompt,
    so a 40-token prompt equals token-by-token encoding, where the default m+b = 9 passes differ beyond 9 tokens."""
    path = _bad_checkpoint(model_dir, tmp_path, "sequential", lambda c: c.update(use_sequential=True))
    prompts = [random_prompt(40, seed=90), random_prompt(3, seed=91)]
    llm = engine(str(path))
    assert model_of(llm).plan.use_sequential and model_of(llm).plan.prefill_passes(40) == 40
    results = generate(llm, prompts, max_tokens=8)
    ref = ReferenceModel(path)
    check_against_reference(results, [ref.generate(p, 8) for p in prompts])
    # the oracle's sequential prefill is token-by-token encoding: its last prompt logits match forward_sequential
    seq_logits = ref.forward_sequential(prompts[0])[-1]
    assert results[0][0][0] == int(seq_logits.argmax())
    iterative = ReferenceModel(model_dir("tiny-w2")).generate(prompts[0], 8)
    assert iterative != ref.generate(prompts[0], 8)  # the setting changes what is served


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_prompt_admitted_among_running_decodes_matches_reference(engine, model_dir, impl, monkeypatch):
    """A cyclic plan: four sequences decode while a 40-token prompt (and a 6-token one) arrive; the steps that mix
    them run the extra passes only over rows that can still change (never the decode rows), and every request
    equals the reference token for token and logprob for logprob."""
    from lckv_vllm.engine.attention.step import pass_substep
    from lckv_vllm.engine.prefill import IterativePrefill

    # tolerance 0: the economy of `_iterate` (adaptive prefill's split passes treat decode rows alike: final after
    # pass 1; covered against the reference in test_prefill.py)
    env = {"LCKV_PREFILL_TOL": "0"} if impl == "auto" else {"LCKV_PREFILL_TOL": "0", "LCKV_ATTENTION_IMPL": impl}
    llm = engine("tiny-w2", env=env)
    mixed = []
    original = IterativePrefill._iterate

    def spy(self, run, positions, seg_in, step, passes):
        if passes > 1 and bool((step.query_lens_cpu == 1).any()):
            second = pass_substep(step, 2)
            mixed.append((step.query_lens_cpu.tolist(), second[1].query_lens_cpu.tolist()))
        return original(self, run, positions, seg_in, step, passes)

    monkeypatch.setattr(IterativePrefill, "_iterate", spy)
    decoding = [random_prompt(n, seed=100 + n) for n in (3, 11, 20, 7)]
    # seeds unlike test_tolerance_zero_is_the_m_plus_b_result's, which shares this engine (a common prefix would
    # be a prefix-cache hit)
    arrivals = [(0, p) for p in decoding] + [(4, random_prompt(40, seed=240)), (9, random_prompt(6, seed=241))]
    results = generate_staggered(llm, arrivals, max_tokens=24)
    assert mixed, "no step mixed a prompt with running decodes"
    for q_lens, second_pass in mixed:
        assert sum(1 for q in q_lens if q == 1) >= 4  # at least four decodes in the step
        assert 1 not in second_pass and len(second_pass) < len(q_lens)  # decode rows ran one pass only
    ref = reference(model_dir, "tiny-w2")
    check_against_reference([(t, lp, 0) for t, lp in results], [ref.generate(p, 24, tol=0) for _, p in arrivals])
