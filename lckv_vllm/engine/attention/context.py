"""The step's attention metadata as the layers see it: vLLM's forward context, read and (for sub-steps) swapped.

vLLM puts one metadata object per KV-cache group into the forward context (`attn_metadata`, keyed by layer name;
a list under speculative decoding, whose first entry is the target model's).  The LCKV metadata builder makes those
objects `LCKVStep`s.  This module is the only reader and writer of that field for the plugin:
* `step_metadata(layer)`: the step a layer reads (None in profiling and dummy runs);
* `link_step_groups()`: the steps of one forward (one per KV-cache group; windowed pages give several) linked as
  one family, so a sub-step can be cut from all of them at once;
* `metadata_swapped(sub)`: a sub-step (the exact re-encoding after preemption, prefill blocks and passes) made the
  metadata of every layer for a while: every layer reads its metadata from the forward context;
* `kv_connector()`: the active KV connector, whose per-layer hooks vLLM calls from its own attention op, which the
  plugin's op replaces (the model calls them itself, per producer and segment).
"""

from __future__ import annotations

import contextlib

from .step import LCKVStep

def step_metadata(layer_name: str):
    """This step's attention metadata for `layer_name` (None in profiling / dummy runs)."""
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # speculative decoding: [0] is the target model's
        md = md[0]
    if isinstance(md, dict):
        md = md.get(layer_name)
    return md


def link_step_groups():
    """The steps of this forward, one per KV-cache group (windowed pages give several), linked as one family
    (`LCKVStep.family`); returns them (empty in profiling / dummy runs)."""
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0]
    values = md.values() if isinstance(md, dict) else [md]
    steps = list({id(v): v for v in values if isinstance(v, LCKVStep)}.values())
    if len(steps) > 1:
        for s in steps:
            s.family = steps
    return steps


@contextlib.contextmanager
def metadata_swapped(step):
    """Make `step` (a sub-step) the attention metadata of every layer for the duration: each layer gets the
    member of `step`'s family cut from the step it has now (one per KV-cache group)."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    saved = ctx.attn_metadata
    by_origin = {id(m.origin): m for m in step.members}
    if len(by_origin) == 1:
        ctx.attn_metadata = {name: step for name in saved}
    else:
        ctx.attn_metadata = {name: by_origin[id(v)] for name, v in saved.items()}
    try:
        yield
    finally:
        ctx.attn_metadata = saved


def kv_connector():
    """The active KV connector of this step (None without one, or outside a step with connector
    metadata)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group, is_v1_kv_transfer_group

    if not has_kv_transfer_group() or not is_v1_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    return connector if connector.has_connector_metadata() else None
