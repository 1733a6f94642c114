"""The runnable units of the plan's segments on this pipeline stage, and what the pass loop asks of them.

One `SegmentUnits` per segment of the stage (`build_segments`, from `LayerPlan.segments` clipped to the stage):
* `unit`: the segment's layers as one `LCKVSegment`, the piece vLLM's torch.compile compiles;
* `split` (cyclic segments in adaptive mode): the segment cut below its top layer, which is always a producer:
  `body` runs the layers below it (`body_first`: the same for a first pass without context, the upward reads of
  zeroed slots skipped), `write_top` only the top producer's K/V write, `tail` the whole top layer.  A pass that is
  not a row's last needs only the producer's K/V of it; the top layer's output is needed once, from the pass after
  which the row is final (prefill.py);
* the segment's producers, for what the prefill asks between passes (`zero_slots`: the zero start of an iterative
  encoding; `capture`: the K/V the producers write during a pass, to measure how far it moved them) and what the
  KV connector needs (`wait_for_kv`, `save_kv`).

The pass loop itself belongs to `prefill.IterativePrefill`; the model only walks the segments in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig

from .attention.context import step_metadata
from ..plan import LayerPlan, Segment


@support_torch_compile(dynamic_arg_dims={"positions": 0, "hidden_states": 0})
class LCKVSegment(nn.Module):
    """A run of layers that the prefill executes as a unit; the unit that vLLM's torch.compile compiles.

    The pass loop of cyclic segments stays outside, in eager Python: its trip count depends on the step.  Each
    segment folds the residual into its output so that every call has the same signature (vLLM traces once).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layers=(), skip_reads=()):
        super().__init__()
        # A plain list, not a ModuleList: the layers are registered under `model.layers.N` (the checkpoint's
        # names) by LCKVModel, not a second time here.
        self._layers = list(layers)
        # per layer: skip its attention (a first-pass unit, see LCKVDecoderLayer.forward); fixed per instance, so
        # each unit traces once
        self._skip = tuple(skip_reads) or (False,) * len(self._layers)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = None
        for layer, skip in zip(self._layers, self._skip):
            hidden_states, residual = layer(positions, hidden_states, residual, skip)
        return hidden_states + residual


@dataclass(frozen=True)
class SplitUnits:
    body: Callable
    body_first: Callable
    write_top: Callable
    tail: Callable

    def units(self) -> tuple:
        return (self.body, self.body_first, self.tail)


class SegmentUnits:
    """One segment of the stage: its units and its producers (see the module docstring)."""

    def __init__(self, seg: Segment, unit: LCKVSegment, split: SplitUnits | None, producers: list, reads: list):
        self.seg = seg
        self.unit = unit
        self.split = split
        self._producers = producers  # vLLM `Attention`s of the segment's producers on this stage
        self._reads = reads  # vLLM `Attention`s whose pages the segment's layers read

    @property
    def cyclic(self) -> bool:
        return self.seg.cyclic

    def run(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.unit(positions, hidden)

    def warm_up(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """vLLM's warm-up and profiling runs (no step): every unit once, so that compiled mode compiles the split
        units at start-up rather than on the first prefill."""
        if self.split is not None:
            u = self.split
            u.tail(positions, u.body(positions, hidden))
            if u.body_first is not u.body:
                u.body_first(positions, hidden)
        return self.unit(positions, hidden)

    def zero_slots(self, step) -> None:
        """This step's K/V of the segment's producers set to zeros.  `step` is the one in the forward context; each
        producer's slots come from its own KV-cache group's member."""
        for attn in self._producers:
            own = step_metadata(attn.layer_name) if step.family is not None else step
            attn.impl.path.zero_slots(attn.kv_cache, own)

    @contextlib.contextmanager
    def capture(self):
        """While open, every producer of the segment records the K/V it writes into the yielded dict (layer name
        -> `[tokens, 2 * kv heads * head_dim]`, in the order they ran)."""
        captured: dict = {}
        for attn in self._producers:
            attn.impl.capture = captured
        try:
            yield captured
        finally:
            for attn in self._producers:
                attn.impl.capture = None

    def wait_for_kv(self, connector, waited: set) -> None:
        """KV transfer: before the segment runs, the producers its layers read must be loaded (once per step)."""
        for attn in self._reads:
            if attn.layer_name not in waited:
                waited.add(attn.layer_name)
                connector.wait_for_layer_load(attn.layer_name)

    def save_kv(self, connector) -> None:
        """KV transfer: the segment's producers are final once it has run (after its last pass): save each once.
        Consumers own no pages, so nothing else is ever saved."""
        for attn in self._producers:
            connector.save_kv_layer(attn.layer_name, attn.kv_cache, step_metadata(attn.layer_name))


def build_segments(plan: LayerPlan, layers, start: int, end: int, vllm_config: VllmConfig, prefix: str,
                   adaptive: bool) -> list[SegmentUnits]:
    """The plan's segments clipped to the stage's layers [start, end) (a cyclic segment is never cut, an acyclic
    one may be).  Split units only in adaptive mode, so that LCKV_PREFILL_TOL=0 runs the full-pass loop, bit for
    bit."""
    attn = lambda i: layers[i].self_attn.attn  # noqa: E731
    out = []
    for k, s in enumerate(x for x in plan.segments if x.start < end and x.end > start):
        seg = Segment(max(s.start, start), min(s.end, end), s.cyclic)
        unit = LCKVSegment(vllm_config=vllm_config, prefix=f"{prefix}.segments.{k}",
                           layers=[layers[i] for i in seg.layers])
        split = None
        top = seg.end - 1
        if adaptive and seg.cyclic and len(seg.layers) >= 2 and plan.roles[top].computes_kv:
            below = [layers[i] for i in seg.layers[:-1]]
            skip = [plan.roles[i].attends_to > i for i in seg.layers[:-1]]
            body = LCKVSegment(vllm_config=vllm_config, prefix=f"{prefix}.body.{k}", layers=below)
            body_first = (LCKVSegment(vllm_config=vllm_config, prefix=f"{prefix}.body_first.{k}", layers=below,
                                      skip_reads=skip) if any(skip) else body)
            tail = LCKVSegment(vllm_config=vllm_config, prefix=f"{prefix}.tail.{k}", layers=[layers[top]])
            split = SplitUnits(body=body, body_first=body_first, write_top=layers[top].write_kv, tail=tail)
        producers = [attn(i) for i in seg.layers if plan.roles[i].computes_kv]
        reads = [attn(p) for p in dict.fromkeys(plan.roles[i].attends_to for i in seg.layers)]
        out.append(SegmentUnits(seg, unit, split, producers, reads))
    return out
