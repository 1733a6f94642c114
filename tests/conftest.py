"""Shared fixtures: seeded tiny checkpoints (built once per session) and in-process vLLM engines (one per
configuration, shared by every test that needs it; in-process mode starts in ~2 s instead of ~25 s)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lckv_vllm.tools.harness import model_of, offline_engine, script_env

script_env()  # in-process engines (model_of() reaches the model), quiet logs: before vLLM loads

from lckv_vllm.tools.checkpoint import make_preset  # noqa: E402

__all__ = ["model_of"]  # the tests and *_run.py scripts import it from here

MAX_MODEL_LEN = 512
BLOCK_SIZE = 16
ROOT = Path(__file__).resolve().parent.parent
# A trained LCKV model (committed; 6 layers, layers 1-4 read layer 4): its iterative prefill converges in a few passes,
# which random-weight checkpoints never do.  Tests of adaptive passes and split consistency need one.
TRAINED_W2 = ROOT / "examples" / "shakespeare-lckv-w2"
# A Tempest passage.  Not held out for the trained examples: it lies in their training split (held-out text for them:
# benchmarks/results/lm_eval_heldout.txt); tests use it as natural prompts only.
HELD_OUT = ROOT / "benchmarks" / "results" / "shakespeare_heldout.txt"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in built:
            built[preset] = make_preset(preset, root / preset)
        return built[preset]

    return get


@pytest.fixture(scope="session")
def model_path(model_dir):
    """The checkpoint the server tests serve (tiny-w2: a cyclic plan)."""
    return model_dir("tiny-w2")


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from server_utils import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture(scope="session")
def engine(model_dir):
    """engine(preset or path, **engine_kwargs) -> a cached vllm.LLM."""
    cache: dict = {}

    def get(model: str, env: dict | None = None, **kw):
        key = (str(model), tuple(sorted((env or {}).items())), repr(sorted(kw.items())))
        if key not in cache:
            path = model if os.path.isdir(str(model)) else str(model_dir(model))
            # enforce_eager: vLLM's torch.compile costs ~25-45 s per engine on this CPU; one test covers it
            args = dict(dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=MAX_MODEL_LEN, seed=0,
                        block_size=BLOCK_SIZE, max_num_seqs=16, enforce_eager=True)
            args.update(kw)
            cache[key] = offline_engine(path, env, **args)
        return cache[key]

    yield get
    # Shutting an in-process engine down costs 1-2 s (vLLM collects garbage several times on the way), minutes for
    # the dozens of engines a run caches, and the process exits right after: leave them to the exit.  An engine
    # with worker processes keeps its shutdown (its workers must not outlive the run).  At exit Triton's nanobind
    # then lists "leaked" functions of those engines' kernels: harmless, the process is ending.
    for llm in cache.values():
        client = llm.llm_engine.engine_core
        if type(client).__name__ == "InprocClient" and getattr(client, "_finalizer", None) is not None:
            client._finalizer.detach()


def random_prompt(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(3, 32000) for _ in range(n)]


def text_prompts(model, count: int, length: int, offset: int = 0) -> list[list[int]]:
    """`count` prompts of `length` tokens: consecutive pieces of the held-out passage, in `model`'s tokenizer."""
    from transformers import AutoTokenizer

    from lckv_vllm import register

    register()
    ids = AutoTokenizer.from_pretrained(str(model)).encode(HELD_OUT.read_text(encoding="utf-8"))
    assert len(ids) >= offset + count * length, (len(ids), count, length)
    return [ids[offset + i * length: offset + (i + 1) * length] for i in range(count)]


def generate(llm, prompts, max_tokens=16):
    """Greedy generation of token-id prompts: [(token ids, logprobs of the chosen tokens, num_cached_tokens)]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append((list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                    o.num_cached_tokens or 0))
    return res


def generate_staggered(llm, arrivals, max_tokens=16):
    """Greedy generation with requests arriving while others run: `arrivals` is [(engine step index, token ids)].

    Drives the engine step by step (`LLMEngine.add_request` / `step`), so a prompt that arrives at step k is
    scheduled together with the decodes of the requests already running.  Returns [(token ids, logprobs)] in
    arrival order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    done: dict = {}
    step = 0
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt) = pending.pop(0)
            eng.add_request(f"staggered-{i}", TokensPrompt(prompt_token_ids=prompt), sp)
        for out in eng.step():
            if out.finished:
                c = out.outputs[0]
                done[int(out.request_id.split("-")[1])] = (
                    list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
        step += 1
        assert step < 10_000
    return [done[i] for i in range(len(arrivals))]


def stream_watching_blocks(llm, prompt, n_gen: int, check=None):
    """One request generating `n_gen` tokens (greedy, ignore_eos), stepped by hand; after every step each KV-cache
    group's blocks held by the request are counted (and handed to `check(group, blocks)` when given).

    Returns (the finished output, most blocks held per group, most preemptions seen)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    eng.add_request("stream-0", TokensPrompt(prompt_token_ids=prompt),
                    SamplingParams(max_tokens=n_gen, temperature=0, ignore_eos=True))
    most, finished, steps, preemptions = [0] * len(managers), None, 0, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished = out
        steps += 1
        assert steps < 2 * n_gen
        preemptions = max([preemptions] + [r.num_preemptions for r in sched.requests.values()])
        for g, m in enumerate(managers):
            for blocks in m.req_to_blocks.values():
                most[g] = max(most[g], sum(not b.is_null for b in blocks))
                if check is not None:
                    check(g, blocks)
    return finished, most, preemptions
