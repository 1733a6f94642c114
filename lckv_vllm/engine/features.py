"""The feature matrix: which vLLM switches work on which kind of LCKV plan, and the start-up guard built from it.

A serving engine must never be silently wrong.  Every vLLM feature users reach for is a row here; every kind of plan
a column; every cell says what the feature does on that kind of plan:

* `exact`     works and gives what the feature gives on a plain model (tested against the reference or against the
              feature switched off);
* `bound`     works, with a stated difference (the note says which, and how large);
* `untested`  plausible but never run by the suite (GPU-only paths, mostly): refused unless the user names the
              feature in `LCKV_ALLOW_UNTESTED` (then served with a warning);
* `refused`   known not to work on that plan: always refused.

`check(vllm_config, plan, settings)` runs in the config hook (`engine/startup.py`), before any weight is read, and
raises one `FeatureError` naming every refused switch, the plan and what to do instead.  Features chosen per
request (beam search, n, logprobs, structured outputs) cannot be refused at start-up; their rows say what they mean
and have no detector.  `tools/feature_table.py` renders the matrix (`lckv-vllm features`); docs/features.md holds that table (a
test keeps them equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..plan import LayerPlan
from ..settings import ALLOW_UNTESTED_ENV, Settings
from .feature_switches import (SPEC_DRAFT, SPEC_NGRAM, SPEC_UNTESTED, async_scheduling, attention_backend,
                               data_parallel, fast_prefill, kv_cache_dtype, kv_cache_fp8, kv_fp8_parallel,
                               kv_offloading, kv_skip_layers, lora, lora_combined, other_connector, pipeline_parallel,
                               pooling, pooling_other, prompt_embeds, quantization, sleep_mode, speculative,
                               storage_connector, storage_connector_tp, tensor_parallel)

PLAN_KINDS = ("cyclic", "acyclic", "identity", "windowed", "streaming")
KIND_TITLES = {
    "cyclic": "cyclic (LCKV)",
    "acyclic": "acyclic sharing (CLA, YOCO)",
    "identity": "identity (plain Llama)",
    "windowed": "windowed pages",
    "streaming": "StreamingLLM mode",
}
STATUSES = ("exact", "bound", "untested", "refused")
_RANK = {s: k for k, s in enumerate(STATUSES)}  # a plan of several kinds gets the worst of its cells


class FeatureError(ValueError):
    """A vLLM feature the served plan does not support, named with what to do instead."""


@dataclass(frozen=True)
class Cell:
    status: str
    note: str = ""

    def __post_init__(self):
        assert self.status in STATUSES, self.status


@dataclass(frozen=True)
class Feature:
    key: str  # the name `LCKV_ALLOW_UNTESTED` uses
    title: str  # as users know it (the switch)
    cells: dict[str, Cell]
    instead: str = ""  # what to do when refused
    tests: str = ""  # where the suite covers it
    # The user's setting when the feature is on in this config, else None.  None for per-request features.
    detect: Callable[[object], str | None] | None = field(default=None, compare=False)

    def cell(self, kind: str) -> Cell:
        return self.cells[kind]


def _all(status: str, note: str = "", **overrides: Cell) -> dict[str, Cell]:
    cells = {k: Cell(status, note) for k in PLAN_KINDS}
    cells.update(overrides)
    return cells


_FP8_NOTE = ("pages hold fp8(x / scale) with per-producer scales (checkpoint or 1.0), every read and every "
             "prefill pass sees those values; equals the fp8 reference (docs/semantics.md); the quality cost is "
             "measured in docs/performance.md")

_NO_SPEC_STREAMING = Cell("refused", "verify steps in StreamingLLM mode are not covered by the suite")

FEATURES: tuple[Feature, ...] = (
    Feature(
        "kv-cache-fp8", "`--kv-cache-dtype fp8` (= `fp8_e4m3`) / `fp8_e5m2`",
        _all("bound", _FP8_NOTE),
        instead="serve with --kv-cache-dtype auto (pages in the model dtype)",
        tests="tests/test_fp8_pages.py", detect=kv_cache_fp8),
    Feature(
        "kv-cache-fp8-parallel", "fp8 pages with tensor or pipeline parallel",
        _all("untested", "each rank stores its own KV heads (TP) or layers (PP) with the producers' scales, as one "
                         "rank does, but the suite has not run fp8 pages on several ranks"),
        instead="serve fp8 pages on one rank, or float pages on several", tests="tests/test_features.py",
        detect=kv_fp8_parallel),
    Feature(
        "kv-cache-dtype", "`--kv-cache-dtype` another float dtype than the model's (`bfloat16` pages of a float32 "
                          "model, ...)",
        _all("refused", "the LCKV attention paths store pages in the model dtype or in fp8 only"),
        instead="serve with --kv-cache-dtype auto, fp8 or fp8_e5m2",
        tests="tests/test_features.py", detect=kv_cache_dtype),
    Feature(
        "kv-skip-layers", "`--kv-cache-dtype-skip-layers` (some layers' pages unquantized)",
        _all("refused", "an LCKV engine stores every producer's pages in one dtype (the attention path's)"),
        instead="quantize every producer's pages, or none", tests="tests/test_features.py", detect=kv_skip_layers),
    Feature(
        "spec-ngram", "speculative decoding: `ngram` (`--speculative-config`)",
        _all("exact", "verify tokens are encoded one per sub-step, as decode would: greedy output equals plain "
                      "decoding", streaming=_NO_SPEC_STREAMING,
             cyclic=Cell("exact", "the k+1 verify tokens are encoded one after another (k+1 runs of the cyclic "
                                  "segment per verify step), whatever LCKV_EXACT_RECOMPUTE says: exact, but no "
                                  "exact verify saves cyclic work over plain decoding (docs/features.md)")),
        instead="serve without --speculative-config", tests="tests/test_features.py",
        detect=speculative(SPEC_NGRAM)),
    Feature(
        "spec-suffix", "speculative decoding: `suffix`, `ngram_gpu`",
        _all("untested", "the target verifies as with ngram, but these proposers never ran with an LCKV plan (suffix "
                         "needs the arctic-inference package, ngram_gpu a GPU)", streaming=_NO_SPEC_STREAMING),
        instead="use method 'ngram', or serve without --speculative-config", detect=speculative(SPEC_UNTESTED)),
    Feature(
        "spec-draft-model", "speculative decoding: `draft_model` (an LCKV checkpoint may be the draft too)",
        _all("exact", "the target verifies as with ngram; an LCKV draft of any plan only proposes tokens",
             windowed=Cell("untested", "draft-model speculation runs in the suite on cyclic, acyclic and identity "
                                       "targets only"),
             streaming=_NO_SPEC_STREAMING),
        instead="use method 'ngram', or serve without --speculative-config", tests="tests/test_features.py",
        detect=speculative(SPEC_DRAFT)),
    Feature(
        "spec-other", "speculative decoding: EAGLE, EAGLE3, MTP, Medusa, MLP speculator, DFlash, custom",
        _all("refused", "the LCKV model exposes no auxiliary hidden states and has no MTP layers"),
        instead="use method 'ngram', or serve without --speculative-config", detect=speculative(None)),
    Feature(
        "lora", "LoRA adapters (`--enable-lora`, PEFT format, several adapters per batch)",
        _all("exact", "each token gets its adapter's deltas on q (consumers) or q/k/v (producers), o and the MLP in "
                      "every prefill pass and sub-step: equals the checkpoint with the adapter merged into its "
                      "weights; an adapter's k/v deltas for a layer that computes no KV under the plan have nothing "
                      "to apply to, like that layer's own k/v weights",
             streaming=Cell("untested", "not run in StreamingLLM mode by the suite")),
        instead="merge the adapter into the weights and serve the merged checkpoint", tests="tests/test_lora.py",
        detect=lora),
    Feature(
        "lora-combined", "LoRA with tensor / pipeline parallelism, speculative decoding, or on a GPU",
        _all("untested", "the sub-step mapping is written for vLLM's GPU wrapper too, but the suite runs LoRA on one "
                         "CPU rank without speculation only"),
        instead="serve LoRA on one CPU rank without --speculative-config, or merge the adapter into the weights",
        tests="tests/test_features.py", detect=lora_combined),
    Feature(
        "quantization", "weight quantization (`--quantization ...`, quantized checkpoints)",
        _all("refused", "the weight loader maps unquantized Llama weights only; quantized layouts are not tested"),
        instead="serve an unquantized checkpoint", detect=quantization),
    Feature(
        "structured-outputs", "structured outputs (guided JSON / regex / choice; per request)",
        _all("exact", "constrains sampling only; the model computes the same logits (lckv-serve: response_format "
                      "json_object / json_schema)"),
        tests="tests/test_features.py, tests/test_server.py"),
    Feature(
        "beam-search", "beam search (per request)",
        _all("exact", "each beam step re-submits the beam as a prompt (vLLM's beam search)",
             cyclic=Cell("bound", "each beam step encodes the beam as a prompt over the prefix cache, iteratively, "
                                  "not token by token as decode would: beam_width=1 equals greedy decoding within "
                                  "the prefill tolerance (exactly with LCKV_CHUNKED_PREFILL=0 LCKV_PREFILL_TOL=0 "
                                  "only for prompts within m+b tokens)")),
        tests="tests/test_features.py"),
    Feature(
        "n", "`n > 1` parallel sampling (per request)",
        _all("exact", "every sample shares the prompt's encoding"), tests="tests/test_features.py"),
    Feature(
        "logprobs", "`logprobs` and `prompt_logprobs` (per request)",
        _all("exact", "", cyclic=Cell("bound", "prompt logprobs come from the iterative prompt encoding (adaptive "
                                               "passes: within the prefill tolerance of m+b passes)")),
        tests="tests/test_features.py, tests/test_prefill.py"),
    Feature(
        "prefix-caching", "prefix caching (`--enable-prefix-caching`, on by default)",
        _all("exact", "", cyclic=Cell("bound", "a cached prefix is read as final and the rest encoded on top of it "
                                               "(chunk-by-chunk semantics); LCKV_CHUNKED_PREFILL=0 turns it off"),
             streaming=Cell("bound", "turned off at start-up (a hit would need the sink pages too)")),
        tests="tests/test_prefill.py, tests/test_streaming_llm.py"),
    Feature(
        "chunked-prefill", "chunked prefill (`--enable-chunked-prefill`, on by default)",
        _all("exact", "", cyclic=Cell("bound", "each chunk is encoded iteratively on top of the earlier, final "
                                               "ones; LCKV_CHUNKED_PREFILL=0 forces whole-prompt prefill")),
        tests="tests/test_prefill.py"),
    Feature(
        "prompt-embeds", "prompt embeddings (`--enable-prompt-embeds`, `prompt_embeds` requests)",
        _all("exact", "the model starts from the given embeddings instead of looking the tokens up: the same "
                      "output as the token prompt whose embeddings they are",
             streaming=Cell("untested", "the suite sends prompt embeddings to cyclic, acyclic, identity and "
                                        "windowed-page plans only")),
        instead="send token prompts", tests="tests/test_features.py", detect=prompt_embeds),
    Feature(
        "pooling", "embeddings (`--runner pooling` / `--convert embed`, `LLM.embed`, vLLM's /v1/embeddings)",
        _all("exact", "vLLM's pooler over the final-norm hidden states (last token by default, normalized): equals "
                      "the reference's",
             cyclic=Cell("bound", "the pooled hidden states come from the iterative prompt encoding (adaptive "
                                  "passes: within the prefill tolerance of m+b passes), as prompt logprobs do"),
             streaming=Cell("untested", "the suite pools cyclic, acyclic, identity and windowed-page plans only")),
        instead="serve the model for generation", tests="tests/test_features.py", detect=pooling),
    Feature(
        "pooling-other", "other pooling conversions (`--convert classify`, `reward`, ...)",
        _all("refused", "they add a classification or reward head that LCKV checkpoints do not have"),
        instead="serve embeddings (--runner pooling) or generation", tests="tests/test_features.py",
        detect=pooling_other),
    Feature(
        "sleep-mode", "sleep mode (`--enable-sleep-mode`)",
        _all("untested", "vLLM's sleep mode runs on CUDA only; never run with an LCKV plan"),
        instead="serve without --enable-sleep-mode", detect=sleep_mode),
    Feature(
        "attention-backend", "`--attention-backend` (or `VLLM_ATTENTION_BACKEND`)",
        _all("refused", "every LCKV layer runs the plugin's attention (reads of pages that later layers write, "
                        "strict-causal masks), whatever backend is named"),
        instead="leave it unset; LCKV_ATTENTION_IMPL=cpu|torch|triton picks the plugin's attention path",
        tests="tests/test_features.py", detect=attention_backend),
    Feature(
        "async-scheduling", "async scheduling (`--async-scheduling`; on by default on GPUs)",
        _all("untested", "CPU: vLLM turns it off; GPU: the config hook turns vLLM's default off and an explicit "
                         "request is refused (overlapping steps with the iterative prefill and the exact "
                         "re-encoding is untested)"),
        instead="serve without --async-scheduling", tests="tests/test_features.py", detect=async_scheduling),
    Feature(
        "compile", "torch.compile (the CPU default) and CUDA graphs",
        _all("exact", "CPU: vLLM's torch.compile compiles the same segment units on every plan (the suite compiles a "
                      "cyclic plan); GPU: the config hook sets enforce_eager (no CUDA graphs: graph capture of the "
                      "iterative prefill is untested)"),
        tests="tests/test_engine.py"),
    Feature(
        "tensor-parallel", "tensor parallel (`--tensor-parallel-size`)",
        _all("exact", windowed=Cell("untested", "the suite runs tensor parallel on cyclic and acyclic plans only"),
             streaming=Cell("untested", "the suite runs tensor parallel on cyclic and acyclic plans only")),
        instead="serve on one rank", tests="tests/test_parallel.py", detect=tensor_parallel),
    Feature(
        "pipeline-parallel", "pipeline parallel (`--pipeline-parallel-size`)",
        _all("exact", "stages are cut only where no reader is separated from its producer",
             windowed=Cell("untested", "the suite runs pipeline parallel on cyclic and acyclic plans only"),
             streaming=Cell("untested", "the suite runs pipeline parallel on cyclic and acyclic plans only")),
        instead="serve on one rank", tests="tests/test_parallel.py", detect=pipeline_parallel),
    Feature(
        "data-parallel", "data parallel (`--data-parallel-size`)",
        _all("untested", "replicas of the whole engine; checked by hand once, not in the suite"),
        instead="run one server per replica behind a load balancer", detect=data_parallel),
    Feature(
        "kv-connector", "KV connector `LCKVStorageConnector` (prefill/decode disaggregation)",
        _all("exact", "only producer pages move",
             windowed=Cell("refused", "the connector moves one KV-cache group; windowed pages make several"),
             streaming=Cell("refused", "the connector does not move sink + window pages")),
        instead="serve with LCKV_WINDOWED_PAGES=0, or without lckv_streaming, on both instances",
        tests="tests/test_kv_transfer.py", detect=storage_connector),
    Feature(
        "kv-connector-tp", "`LCKVStorageConnector` with tensor parallel",
        _all("refused", "every rank would write the same files"), instead="one rank per instance",
        tests="tests/test_features.py", detect=storage_connector_tp),
    Feature(
        "kv-connector-other", "other KV connectors (NIXL, LMCache, offloading, ...)",
        _all("untested", "they move the KV tensors vLLM registered (producers only); GPU-only, not in the suite"),
        instead="use LCKVStorageConnector (lckv_vllm.engine.connector)", detect=other_connector),
    Feature(
        "kv-offloading", "KV offloading to CPU memory (`--kv-offloading-size`)",
        _all("untested", "not in the suite"), instead="serve without --kv-offloading-size", detect=kv_offloading),
    Feature(
        "kv-sharing-fast-prefill", "`--kv-sharing-fast-prefill`",
        _all("refused", "vLLM's shortcut skips the prefill of layers that share KV; LCKV layers read K/V the "
                        "prefill passes still compute"),
        instead="serve without --kv-sharing-fast-prefill", detect=fast_prefill),
)
BY_KEY = {f.key: f for f in FEATURES}


def plan_kinds(plan: LayerPlan, settings: Settings) -> tuple[str, ...]:
    """The matrix columns that describe `plan` as served: one of cyclic / acyclic / identity, plus windowed pages
    and StreamingLLM mode where they apply."""
    kinds = ["cyclic" if plan.is_cyclic else "identity" if plan.is_identity else "acyclic"]
    if plan.streaming is not None:
        kinds.append("streaming")
    elif settings.windowed_pages and plan.windowed_producers:
        kinds.append("windowed")
    return tuple(kinds)


def cell_for(feature: Feature, kinds: tuple[str, ...]) -> Cell:
    """The worst cell of `feature` over the plan's kinds."""
    return max((feature.cell(k) for k in kinds), key=lambda c: _RANK[c.status])


def check(vllm_config, plan: LayerPlan, settings: Settings, log=None) -> None:
    """Refuse (FeatureError) every switched-on feature the plan does not support; warn about allowed untested
    ones.  Runs before any weight is read."""
    unknown = sorted(set(settings.allow_untested) - set(BY_KEY))
    if unknown:
        raise FeatureError(f"{ALLOW_UNTESTED_ENV}: unknown feature key(s) {', '.join(unknown)}; known: "
                           + ", ".join(f.key for f in FEATURES if "untested" in {c.status for c in f.cells.values()}))
    kinds = plan_kinds(plan, settings)
    refused = []
    for f in FEATURES:
        if f.detect is None:
            continue
        setting = f.detect(vllm_config)
        if setting is None:
            continue
        cell = cell_for(f, kinds)
        if cell.status == "untested" and f.key in settings.allow_untested:
            if log is not None:
                log.warning("LCKV: %s on a %s plan is untested (%s); served because %s names %r",
                            setting, "/".join(kinds), cell.note, ALLOW_UNTESTED_ENV, f.key)
            continue
        if cell.status in ("untested", "refused"):
            line = f"{setting}: {cell.note}; instead: {f.instead}"
            if cell.status == "untested":
                line += f" (or set {ALLOW_UNTESTED_ENV}={f.key} to try it)"
            refused.append(line)
    if refused:
        raise FeatureError(
            f"LCKV plan {plan.layer_types} ({'/'.join(kinds)}) does not support "
            f"{'this vLLM feature' if len(refused) == 1 else 'these vLLM features'} (docs/features.md):\n  - "
            + "\n  - ".join(refused))
