"""The layer plan: the single source of truth for every layer's role.

`layer_types` (the official LCKV config string, one `_`-joined entry per layer, each `^\\d+s?$`) says which layer's
KVs each layer's queries read.  Everything else derives from the `LayerPlan` built here: which layers own KV pages
(producers), which attention is strictly causal, the sliding windows, the prefill segments and their pass counts,
the weights a checkpoint must carry, and the KV bytes per token.  The model, the weight loader, the attention flags,
the allocator and the reference all read the plan; none of them re-derive roles.

This module knows nothing of vLLM or torch on purpose: it is plain data, cheap to import and easy to test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .streaming_spec import Streaming, StreamingError, streaming_from_config

_ENTRY = re.compile(r"^(\d+)(s?)$")

DEFAULT_FORWARD_PASSES = 7
DEFAULT_BACKWARD_PASSES = 2


class LayerPlanError(ValueError):
    """A `layer_types` string (or a config field it depends on) that cannot be served."""


@dataclass(frozen=True)
class LayerRole:
    """What one layer does."""

    index: int
    attends_to: int  # the layer whose K/V this layer's queries read
    computes_kv: bool  # some layer reads this layer's K/V: it has k/v projections and owns KV pages
    attends_top: bool  # attends_to > index: reads a layer computed later (cyclic dependency)
    strict: bool  # the query at t sees keys < t only (attends_top or force_nodiag)
    sliding: bool  # sliding-window attention (the entry ends in "s")

    @property
    def kind(self) -> str:
        if self.computes_kv and self.attends_to == self.index:
            return "producer"
        if self.computes_kv:
            return "producer+reader"
        return "consumer"


@dataclass(frozen=True)
class Segment:
    """A run of consecutive layers [start, end) that the prefill executes as a unit."""

    start: int
    end: int
    cyclic: bool  # some layer reads a layer above it within the segment: iterate it

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True)
class LayerPlan:
    layer_types: str
    roles: tuple[LayerRole, ...]
    segments: tuple[Segment, ...]
    forward_passes: int = DEFAULT_FORWARD_PASSES
    backward_passes: int = DEFAULT_BACKWARD_PASSES
    force_nodiag: bool = False
    sliding_window: int | None = None
    use_sequential: bool = False  # encode prompts token by token (exact, one pass per token of the longest prompt)
    streaming: Streaming | None = None  # StreamingLLM mode: every producer keeps sinks + a window (streaming_spec.py)
    _producers: tuple[int, ...] = field(default=(), repr=False)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def parse(
        cls,
        layer_types: str | None,
        num_layers: int | None = None,
        *,
        forward_passes: int = DEFAULT_FORWARD_PASSES,
        backward_passes: int = DEFAULT_BACKWARD_PASSES,
        force_nodiag: bool = False,
        sliding_window: int | None = None,
        use_sequential: bool = False,
        streaming: Streaming | None = None,
    ) -> "LayerPlan":
        if layer_types is None:
            if num_layers is None:
                raise LayerPlanError("layer_types: missing, and num_hidden_layers is not given either")
            layer_types = "_".join(str(i) for i in range(num_layers))
        if not isinstance(layer_types, str):
            raise LayerPlanError(f"layer_types: expected a string like '0_2_2', got {type(layer_types).__name__}")
        entries = layer_types.strip().split("_")
        if num_layers is not None and len(entries) != num_layers:
            raise LayerPlanError(
                f"layer_types: has {len(entries)} entries but num_hidden_layers is {num_layers} "
                f"(one entry per layer, joined by '_')"
            )
        n = len(entries)
        attends: list[int] = []
        sliding: list[bool] = []
        for i, entry in enumerate(entries):
            m = _ENTRY.match(entry)
            if m is None:
                raise LayerPlanError(
                    f"layer_types: entry {i} is {entry!r}; each entry must be a layer index with an optional "
                    f"trailing 's' (sliding window), e.g. '3' or '3s'"
                )
            j = int(m.group(1))
            if j >= n:
                raise LayerPlanError(
                    f"layer_types: entry {i} is {entry!r}, but there are only {n} layers (valid indices 0..{n - 1})"
                )
            attends.append(j)
            sliding.append(bool(m.group(2)))
        if forward_passes < 1 or backward_passes < 0:
            raise LayerPlanError(
                f"forward_passes/backward_passes: need forward_passes >= 1 and backward_passes >= 0, "
                f"got {forward_passes}/{backward_passes}"
            )
        if any(sliding) and (sliding_window is None or sliding_window < 1):
            first = sliding.index(True)
            raise LayerPlanError(
                f"sliding_window: layer_types entry {first} ({entries[first]!r}) asks for sliding-window attention "
                f"but sliding_window is {sliding_window!r}"
            )
        if streaming is not None and any(sliding):
            first = sliding.index(True)
            raise LayerPlanError(
                f"lckv_streaming: layer_types entry {first} ({entries[first]!r}) is sliding-window; streaming gives "
                f"every layer sinks + a window of its own, so serve it with a plan without 's' entries"
            )
        producers = sorted(set(attends))
        roles = tuple(
            LayerRole(
                index=i,
                attends_to=attends[i],
                computes_kv=i in producers,
                attends_top=attends[i] > i,
                strict=force_nodiag or attends[i] > i,
                sliding=sliding[i],
            )
            for i in range(n)
        )
        plan = cls(
            layer_types="_".join(entries),
            roles=roles,
            segments=_segments(attends),
            forward_passes=forward_passes,
            backward_passes=backward_passes,
            force_nodiag=force_nodiag,
            sliding_window=sliding_window,
            use_sequential=bool(use_sequential),
            streaming=streaming,
            _producers=tuple(producers),
        )
        plan._check_invariants()
        return plan

    def _check_invariants(self) -> None:
        # Every layer read by another computes its own KV, and a layer that computes KV owns its pages even when its
        # own queries read another layer.  So the KV-sharing relation handed to the allocator only ever links a
        # non-producing layer to a producer: depth one, never a chain (A shares B's pages, B shares C's).
        for r in self.roles:
            assert self.roles[r.attends_to].computes_kv, r
            if not r.computes_kv:
                assert self.roles[self.kv_owner(r.index)].computes_kv
        covered = [i for s in self.segments for i in s.layers]
        assert covered == list(range(self.num_layers)), covered

    # ---- derived facts ------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.roles)

    @property
    def producers(self) -> tuple[int, ...]:
        """Layers that compute K/V and own KV pages, in layer order."""
        return self._producers

    @property
    def num_passes(self) -> int:
        """Passes over a cyclic segment during prefill (m + b)."""
        return self.forward_passes + self.backward_passes

    def prefill_passes(self, longest_query: int) -> int:
        """Passes over each cyclic segment for a step whose longest query has `longest_query` tokens.

        After k passes the first k tokens of every query are exact, so min(m+b, longest) passes give the m+b-pass
        result (a decode-only step needs one).  With `use_sequential` every token is made exact: as many passes as
        the longest query has tokens, which equals token-by-token encoding.
        """
        if longest_query <= 1:
            return 1
        return longest_query if self.use_sequential else min(self.num_passes, longest_query)

    @property
    def is_cyclic(self) -> bool:
        return any(s.cyclic for s in self.segments)

    @property
    def is_identity(self) -> bool:
        return all(r.attends_to == r.index for r in self.roles)

    def kv_owner(self, layer: int) -> int:
        """The layer whose pages hold `layer`'s KV slot: itself if it computes KV, else the layer it reads.

        Only meaningful for the allocator; a non-producer has no KV of its own, so it is bound to the pages it reads.
        """
        r = self.roles[layer]
        return layer if r.computes_kv else r.attends_to

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.roles[layer].sliding else None

    def readers(self, producer: int) -> tuple[int, ...]:
        """The layers whose queries read `producer`'s K/V (itself included when it does)."""
        return tuple(r.index for r in self.roles if r.attends_to == producer)

    def page_window(self, producer: int) -> int | None:
        """How far back any reader can see into `producer`'s pages: `sliding_window` when every layer reading it is
        sliding-window, else None (some reader needs the whole sequence).  A producer with a page window gets
        vLLM's sliding-window KV spec, so its pages that fall out of the window are freed (windowed pages)."""
        if not self.roles[producer].computes_kv:
            raise ValueError(f"layer {producer} keeps no KV")
        if self.streaming is not None:  # sinks + window pages (their own KV spec, engine/sink_window_pages.py)
            return self.streaming.window
        return self.sliding_window if all(self.roles[r].sliding for r in self.readers(producer)) else None

    @property
    def windowed_producers(self) -> tuple[int, ...]:
        return tuple(p for p in self.producers if self.page_window(p) is not None)

    def kv_tokens_per_sequence(self, windowed_pages: bool = True) -> int | None:
        """The most tokens of one sequence any producer's pages keep (None: the whole sequence): sinks + window in
        streaming mode, the window when every producer has windowed pages."""
        if not windowed_pages:
            return None
        if self.streaming is not None:
            return self.streaming.span
        if self.producers and len(self.windowed_producers) == len(self.producers):
            return self.sliding_window
        return None

    def kv_bytes_per_token(self, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        return len(self.producers) * 2 * num_kv_heads * head_dim * dtype_bytes

    def full_kv_bytes_per_token(self, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        return self.num_layers * 2 * num_kv_heads * head_dim * dtype_bytes

    @property
    def kv_ratio(self) -> float:
        """KV memory relative to a model where every layer keeps its KV (producers / layers)."""
        return len(self.producers) / self.num_layers

    # ---- pipeline parallelism --------------------------------------------------------------------------------------
    def cut_conflicts(self, cut: int) -> list[tuple[int, int]]:
        """(reader, producer) pairs that a pipeline cut before layer `cut` would put on different stages.

        A layer reads its producer's KV pages, which live on the producer's stage, and a cyclic segment's passes
        run within one stage: any cut inside a cyclic segment separates some reader from the layer it reads."""
        return [(r.index, r.attends_to) for r in self.roles if (r.index < cut) != (r.attends_to < cut)]

    def pipeline_stages(self, num_stages: int, sizes: list[int] | None = None) -> tuple[tuple[int, int], ...]:
        """Layer ranges [start, end) of `num_stages` pipeline stages.

        `sizes` (layers per stage, e.g. from `VLLM_PP_LAYER_PARTITION`) are validated: a cut that separates a
        reader from its producer is refused with the layers named.  Without `sizes`, the cuts are placed only where
        no reader is separated from its producer, as evenly as possible (the largest stage as small as possible).
        """
        n = self.num_layers
        if num_stages < 1:
            raise LayerPlanError(f"pipeline stages: need at least 1, got {num_stages}")
        if sizes is not None:
            if len(sizes) != num_stages or sum(sizes) != n or min(sizes) < 1:
                raise LayerPlanError(f"pipeline partition {sizes}: needs {num_stages} positive sizes adding up to "
                                     f"{n} layers")
            cuts = [sum(sizes[:k]) for k in range(1, num_stages)]
            for c in cuts:
                conflicts = self.cut_conflicts(c)
                if conflicts:
                    pairs = ", ".join(f"layer {r} reads layer {p}" for r, p in conflicts[:4])
                    seg = next((s for s in self.segments if s.cyclic and s.start < c < s.end), None)
                    inside = f"; it would cut the cyclic segment [{seg.start},{seg.end})" if seg else ""
                    raise LayerPlanError(
                        f"pipeline partition {sizes}: the cut between layers {c - 1} and {c} puts a reader and the "
                        f"layer whose KV it reads on different stages ({pairs}){inside}; valid cuts for "
                        f"layer_types {self.layer_types}: before layers {self.valid_cuts() or 'none'}")
        else:
            cuts = self._balanced_cuts(num_stages)
        bounds = [0, *cuts, n]
        return tuple((bounds[k], bounds[k + 1]) for k in range(num_stages))

    def valid_cuts(self) -> list[int]:
        return [c for c in range(1, self.num_layers) if not self.cut_conflicts(c)]

    def _balanced_cuts(self, num_stages: int) -> list[int]:
        valid = self.valid_cuts()
        if len(valid) < num_stages - 1:
            raise LayerPlanError(
                f"pipeline parallel size {num_stages}: layer_types {self.layer_types} can be cut only before layers "
                f"{valid or 'none'} (a reader and its producer must share a stage), so at most {len(valid) + 1} "
                f"stages")
        n = self.num_layers
        # best[k][c]: the smallest possible largest stage for layers [0, c) in k stages ending at cut c
        points = [0, *valid, n]
        best = {(1, c): (c, None) for c in points[1:]}
        for k in range(2, num_stages + 1):
            for j, c in enumerate(points[1:], start=1):
                options = [(max(best[(k - 1, b)][0], c - b), b) for b in points[1:j] if (k - 1, b) in best]
                if options:
                    best[(k, c)] = min(options)
        cuts, c = [], n
        for k in range(num_stages, 1, -1):
            c = best[(k, c)][1]
            cuts.append(c)
        return sorted(cuts)

    def describe(self) -> str:
        """A per-layer table and the summary, as printed by `lckv-vllm plan`."""
        lines = [f"layer_types: {self.layer_types}", "", "layer  attends_to  computes_kv  attends_top  strict  sliding  segment"]
        seg_of = {}
        for k, s in enumerate(self.segments):
            for i in s.layers:
                seg_of[i] = f"{k}:[{s.start},{s.end}){' cyclic' if s.cyclic else ''}"
        for r in self.roles:
            lines.append(
                f"{r.index:>5}  {r.attends_to:>10}  {str(r.computes_kv):>11}  {str(r.attends_top):>11}  "
                f"{str(r.strict):>6}  {str(r.sliding):>7}  {seg_of[r.index]}"
            )
        passes = f"{self.num_passes} (forward_passes {self.forward_passes} + backward_passes {self.backward_passes})"
        if self.use_sequential:
            passes = "one per token of the longest prompt (use_sequential: token-by-token, exact)"
        lines += [
            "",
            f"layers: {self.num_layers}, producers (layers with KV pages): {len(self.producers)} {list(self.producers)}",
            f"segments: {', '.join(f'[{s.start},{s.end})' + (' cyclic' if s.cyclic else '') for s in self.segments)}",
            f"prefill passes over cyclic segments: {passes if self.is_cyclic else '1 (acyclic plan: no iteration)'}",
            f"force_nodiag: {self.force_nodiag}, sliding_window: {self.sliding_window}",
            f"streaming: {self.streaming.describe() if self.streaming else 'off'}",
            f"KV cache per token vs. an all-layer model: {len(self.producers)}/{self.num_layers} = {self.kv_ratio:.4f} "
            f"(capacity x{self.num_layers / len(self.producers):.2f})",
        ]
        return "\n".join(lines)


def _segments(attends: list[int]) -> tuple[Segment, ...]:
    """Cut the layers the way the official iteration plan does (see docs/semantics.md).

    A cyclic segment starts at a layer that reads a higher layer and ends right after the smallest `top` such that no
    layer in [start, top] reads above `top`; an acyclic segment runs up to the next layer that reads upward.
    """
    n = len(attends)
    out: list[Segment] = []
    i = 0
    while i < n:
        if attends[i] > i:
            top = attends[i]
            k = i
            while k <= top:
                top = max(top, attends[k])
                k += 1
            out.append(Segment(i, top + 1, True))
            i = top + 1
        else:
            j = i
            while j < n and attends[j] <= j:
                j += 1
            out.append(Segment(i, j, False))
            i = j
    return tuple(out)


def layer_types_of(config) -> str | None:
    """The `layer_types` string of any config object: ours, a raw dict-like one, or a plain Llama config."""
    value = getattr(config, "lckv_layer_types", None)
    if value is None:
        value = getattr(config, "layer_types", None)
        if isinstance(value, (list, tuple)):  # a plain HF config already split the string into characters or names
            joined = "".join(str(x) for x in value)
            value = joined if all(ch.isdigit() or ch in "_s" for ch in joined) else None
    return value


def plan_from_config(config) -> "LayerPlan":
    """The plan of an HF-style config object (attributes as in the official checkpoints)."""
    try:
        streaming = streaming_from_config(config)
    except StreamingError as e:
        raise LayerPlanError(str(e)) from None
    return LayerPlan.parse(
        layer_types_of(config),
        getattr(config, "num_hidden_layers", None),
        forward_passes=int(getattr(config, "forward_passes", DEFAULT_FORWARD_PASSES)),
        backward_passes=int(getattr(config, "backward_passes", DEFAULT_BACKWARD_PASSES)),
        force_nodiag=bool(getattr(config, "force_nodiag", False)),
        sliding_window=getattr(config, "sliding_window", None),
        use_sequential=bool(getattr(config, "use_sequential", False)),
        streaming=streaming,
    )


# Named patterns, by number of layers.  Used by presets, tests and the CLI.
PATTERNS = ("identity", "w2", "w10", "sandwich", "cla", "yoco", "lasagna")


def pattern(name: str, num_layers: int) -> str:
    L = num_layers
    if name == "identity":
        return "_".join(str(i) for i in range(L))
    if name == "w2":  # LCKV with 2 warmup layers: bottom and top keep their own KV, the rest read the top-but-one
        return "_".join(["0"] + [str(L - 2)] * (L - 2) + [str(L - 1)])
    if name == "w10":  # the released w=10 layout scaled: 5 bottom and 5 top layers keep KV
        w = min(5, (L - 1) // 2)
        mid = L - w - 1  # the layer that the middle ones read
        return "_".join([str(i) for i in range(w)] + [str(mid)] * (mid - w + 1) + [str(i) for i in range(mid + 1, L)])
    if name == "sandwich":  # sandwich-middle: layers 1..L-2 read the middle layer
        mid = L // 2 - 1
        return "_".join(["0"] + [str(mid)] * (L - 2) + [str(L - 1)])
    if name == "cla":  # cross-layer attention, pairs share the lower layer's KV
        return "_".join(str(i - i % 2) for i in range(L))
    if name == "yoco":  # first half self-attention with a window, second half reads the middle layer
        half = L // 2
        return "_".join([f"{i}s" for i in range(half)] + [str(half - 1)] * (L - half))
    if name == "lasagna":  # pairs read the upper layer of the pair
        return "_".join(str(i | 1 if (i | 1) < L else i) for i in range(L))
    raise LayerPlanError(f"unknown pattern {name!r}; known: {', '.join(PATTERNS)}")
