"""Weight loading for `LCKVLlamaForCausalLM`: official checkpoint names → vLLM's fused parameters.

Which layers must carry `k_proj`/`v_proj` comes from the plan, and a checkpoint that disagrees with its own
`layer_types` fails here with a message naming the layer and the weight, not deep inside a kernel.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from vllm.model_executor.model_loader.weight_utils import default_weight_loader

logger = logging.getLogger("lckv_vllm")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# a layer's fp8 K/V page scales, in the spellings vLLM's loaders accept; "kv_scale" (old) is one scale for both
_KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:attn\.|k_proj\.|v_proj\.)?(k_scale|v_scale|kv_scale)$")

# (fused vLLM parameter, checkpoint name, shard id)
_STACKED = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


class CheckpointError(ValueError):
    """A checkpoint whose weights do not match its config's `layer_types`."""


def load_lckv_weights(model, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    plan = model.plan
    params = dict(model.named_parameters())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    loaded: set[str] = set()
    seen_kv: dict[int, set[str]] = {}
    ignored: list[str] = []
    # pipeline parallelism: this stage holds layers [start, end) and maybe neither the embedding nor the head
    start, end = model.model.start_layer, model.model.end_layer
    here = {"model.embed_tokens.": _present(model.model.embed_tokens), "model.norm.": _present(model.model.norm),
            "lm_head.": _present(model.lm_head) and not tied}
    scales: dict[int, list[float]] = {}
    for name, w in weights:
        if (sm := _KV_SCALE.match(name)) is not None:
            _read_scale(scales, name, int(sm.group(1)), sm.group(2), w)
            continue
        if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
            continue
        if tied and name.startswith("lm_head."):
            continue  # the head is the embedding
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else None
        if layer is not None and layer >= plan.num_layers:
            raise CheckpointError(f"weight {name}: layer {layer} does not exist (num_hidden_layers={plan.num_layers})")
        if (layer is not None and not start <= layer < end) or any(
                name.startswith(k) and not present for k, present in here.items()):
            continue  # another pipeline stage's weight
        is_kv = layer is not None and (".self_attn.k_proj." in name or ".self_attn.v_proj." in name)
        if is_kv:
            if not plan.roles[layer].computes_kv:
                ignored.append(name)  # no layer reads this layer's KV: the weight is dead
                continue
            seen_kv.setdefault(layer, set()).add("k_proj" if ".k_proj." in name else "v_proj")
        computes_kv = layer is None or plan.roles[layer].computes_kv
        stacked = next(
            ((fused, ckpt, shard) for fused, ckpt, shard in _STACKED
             # a consumer's q_proj is a parameter of its own, not a shard of a fused qkv_proj
             if ckpt in name and not (fused == ".qkv_proj" and not computes_kv)),
            None,
        )
        if stacked is not None:
            fused, ckpt, shard = stacked
            target = name.replace(ckpt, fused)
            param = params.get(target)
            if param is None:
                raise CheckpointError(f"weight {name}: the model has no parameter {target}")
            param.weight_loader(param, w, shard)
        else:
            target = name
            param = params.get(name)
            if param is None:
                raise CheckpointError(f"weight {name}: not a parameter of LCKVLlamaForCausalLM with this layer_types")
            getattr(param, "weight_loader", default_weight_loader)(param, w)
        loaded.add(target)

    for p in plan.producers:
        if not start <= p < end:
            continue
        missing = {"k_proj", "v_proj"} - seen_kv.get(p, set())
        if missing:
            readers = [r.index for r in plan.roles if r.attends_to == p]
            original = getattr(model.config, "layer_types_overridden_from", None)
            raise CheckpointError(
                f"layer {p} computes KV (layer_types entries {readers} read it) but the checkpoint has no "
                + " or ".join(f"model.layers.{p}.self_attn.{w}.weight" for w in sorted(missing))
                + (f": the override layer_types={plan.layer_types!r} makes layer {p} a producer, but in the "
                   f"checkpoint's own plan ({original!r}) it is a consumer without k/v projections; choose a "
                   f"pattern whose producers are among the checkpoint's producers" if original else "")
            )
    _set_scales(model, scales, start, end)
    if ignored:
        logger.warning("ignoring %d k/v projection weights of layers whose KV no layer reads: %s", len(ignored),
                       ", ".join(ignored[:4]) + (" ..." if len(ignored) > 4 else ""))
    missing_params = [n for n in params if n not in loaded and not (tied and n.startswith("lm_head."))]
    if missing_params:
        raise CheckpointError(f"checkpoint is missing weights: {', '.join(sorted(missing_params)[:8])}")
    return loaded | ({n for n in params if n.startswith("lm_head.")} if tied else set())


def _read_scale(scales: dict, name: str, layer: int, which: str, w: torch.Tensor) -> None:
    if w.numel() != 1:
        raise CheckpointError(f"weight {name}: {w.numel()} values; the LCKV fp8 pages take one K and one V scale per "
                              f"layer (per-tensor), not per-head scales")
    value = float(w.reshape(-1)[0])
    if not value > 0 or value == float("inf"):
        raise CheckpointError(f"weight {name}: KV scale {value} (must be a positive finite number)")
    pair = scales.setdefault(layer, [1.0, 1.0])
    for j in {"k_scale": (0,), "v_scale": (1,), "kv_scale": (0, 1)}[which]:
        pair[j] = value


def _set_scales(model, scales: dict[int, list[float]], start: int, end: int) -> None:
    """The checkpoint's K/V scales onto this stage's producers (`LCKVAttentionImpl.kv_scales`, read by every layer
    that reads the producer's pages).  A consumer's scales are dropped: it owns no pages."""
    plan = model.plan
    dropped = sorted(i for i in scales if not plan.roles[i].computes_kv)
    if dropped:
        logger.info("ignoring the KV scales of layers %s: they keep no KV pages under layer_types %s", dropped,
                    plan.layer_types)
    for layer, (ks, vs) in scales.items():
        if start <= layer < end and plan.roles[layer].computes_kv:
            model.model.layers[layer].self_attn.attn.impl.kv_scales = (ks, vs)


def _present(module) -> bool:
    """False for a part this model does not hold: another pipeline stage's, or the LM head of a pooling model
    (vLLM's pooling adapter builds the model with `StageMissingLayer` in its place)."""
    from vllm.model_executor.models.utils import PPMissingLayer, StageMissingLayer

    return not isinstance(module, (PPMissingLayer, StageMissingLayer))
