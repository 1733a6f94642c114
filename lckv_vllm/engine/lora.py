"""LoRA adapters on LCKV plans: each token keeps its own adapter while the prefill runs subsets of the step's rows.

vLLM maps the step's tokens to adapters once per step, in its punica wrapper (`token_lora_indices`, one entry per
scheduled token), and every LoRA-wrapped linear layer applies that mapping to the rows it is given.  vLLM's Llama
gives every layer all the rows; the iterative prefill does not: later passes, prefill blocks, split passes and the
parts of an exact re-encoding call the layers on sub-steps.  With the whole-step mapping the CPU ops fail on fewer
rows, the GPU kernels read rows that are not there, and a subset of the same size would silently get other tokens'
adapters.  So while a sub-step runs (`AdapterRows.scope`), the wrapper holds the sub-step's part of the mapping
(the step's mapping indexed by the sub-step's `rows`, through every `origin` up to the step) and gets the enclosing
mapping back afterwards.  The embedding and the logits see whole-step tensors and keep vLLM's mapping.
"""

from __future__ import annotations

import contextlib

import torch

from . import vllm_patches as vp
from .attention.step import LCKVStep


class AdapterRows:
    """The punica wrapper's token mapping, cut to each sub-step while it runs.  The wrapper is looked up in `model`
    at the first step, after vLLM has wrapped its layers (none: the engine serves no LoRA)."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._wrapper = None
        self._looked = False
        self._step: LCKVStep | None = None  # the step whose mapping is the wrapper's own
        self._full: torch.Tensor | None = None  # that mapping (None: no token of the step has an adapter)
        self._applied: list[torch.Tensor] = []  # the mappings of the sub-steps entered, innermost last

    def begin_step(self, step: LCKVStep) -> None:
        if not self._looked:
            self._wrapper, self._looked = punica_wrapper_of(self._model), True
        self._step, self._full = step, None
        w = self._wrapper
        if w is not None:
            full = w.token_lora_indices.clone()
            if bool((full >= 0).any()):  # a step without adapters runs as vLLM's would: nothing to cut
                self._full = full

    def _indices(self, step: LCKVStep) -> torch.Tensor:
        if step is self._step or step.origin is None:
            return self._full
        return self._indices(step.origin).index_select(0, step.rows)

    @contextlib.contextmanager
    def scope(self, sub: LCKVStep):
        """Run the body with `sub`'s rows of the mapping (a no-op when the step uses no adapter)."""
        if self._full is None:
            yield
            return
        idx = self._indices(sub)
        outer = self._applied[-1] if self._applied else self._full
        vp.set_lora_token_mapping(self._wrapper, idx)
        self._applied.append(idx)
        try:
            yield
        finally:
            self._applied.pop()
            vp.set_lora_token_mapping(self._wrapper, outer)

def punica_wrapper_of(model: torch.nn.Module):
    """The punica wrapper vLLM gave `model`'s LoRA layers (one object shared by all), or None without LoRA layers."""
    return next((w for m in model.modules() if (w := getattr(m, "punica_wrapper", None)) is not None), None)
