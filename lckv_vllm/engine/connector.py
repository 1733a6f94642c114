"""KV transfer between vLLM instances that moves producers' pages only (prefill/decode disaggregation).

`LCKVStorageConnector` is vLLM's `ExampleConnector` (shared-storage KV transfer: the prefill instance writes each
prompt's KV to a folder named by the prompt's hash, the decode instance finds it and loads it instead of
prefilling), made to fit a layer plan:

* **producers only**: a consumer layer's pages *are* its producer's pages (vLLM KV sharing), so only producers are
  saved and loaded; bytes moved per token = producers / layers of an all-layer model's;
* **saved once, when final**: vLLM's attention layers save from their own forward, which the plugin's attention op
  bypasses; the model calls the connector itself (`LCKVModel._save_kv`): each producer after the *last pass* of its
  segment, not per pass and not per reader, and waits for a producer's load before the first segment reading it;
* **checked**: the first save writes `lckv_manifest.json` (plan, producers, block size, KV shape, dtype) beside the
  KV; a decode instance whose model disagrees refuses at start-up, naming the field, and refuses a transfer it meets
  later (that request is prefilled locally, and the log says so, as it does for any prompt without a transfer);
* **counted**: bytes and layers saved/loaded per request, logged and kept in `stats`.

Use it with `--kv-transfer-config '{"kv_connector": "LCKVStorageConnector", "kv_connector_module_path":
"lckv_vllm.engine.connector", "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
"kv_connector_extra_config": {"shared_storage_path": DIR}}'` (docs/serving.md).  Limits (ExampleConnector's own):
a prompt is transferred when the prefill instance encodes it in one step, whole blocks only (the decode instance
computes the last, partial block itself), one KV-cache group (no windowed pages or streaming), no tensor
parallelism (every rank would write the same files).
"""

from __future__ import annotations

import json
import logging
import os
import time
from types import SimpleNamespace

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector, align_to_block_size

from ..plan import plan_from_config

logger = logging.getLogger("lckv_vllm")

MANIFEST = "lckv_manifest.json"


class KVTransferConfigError(ValueError):
    """A KV transfer set-up this connector cannot serve."""


def _manifest_of(vllm_config, kv_cache_config) -> dict:
    hf = vllm_config.model_config.hf_config
    plan = plan_from_config(hf)
    m = {"layer_types": plan.layer_types, "producers": list(plan.producers),
         "block_size": vllm_config.cache_config.block_size,
         "num_key_value_heads": hf.num_key_value_heads,
         "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
         "dtype": str(vllm_config.model_config.dtype).replace("torch.", ""),
         # fp8 pages are bytes another page dtype would misread (and their values depend on the producers' scales)
         "kv_cache_dtype": vllm_config.cache_config.cache_dtype}
    return m


def check_setup(vllm_config, kv_cache_config) -> None:
    """What this connector cannot serve, refused before anything is written (errors name the setting)."""
    where = "kv_transfer_config"
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp > 1:
        raise KVTransferConfigError(
            f"{where}: LCKVStorageConnector writes one file per layer, which {tp} tensor-parallel ranks would "
            f"overwrite: use tensor_parallel_size 1 with it (GPU connectors such as NixlConnector transfer per rank)")
    if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
        raise KVTransferConfigError(
            f"{where}: LCKVStorageConnector moves one KV-cache group, this model has "
            f"{len(kv_cache_config.kv_cache_groups)} (windowed pages: set LCKV_WINDOWED_PAGES=0)")
    if plan_from_config(vllm_config.model_config.hf_config).streaming is not None:
        raise KVTransferConfigError(f"{where}: LCKVStorageConnector does not move streaming (lckv_streaming) pages: "
                                    f"their middle blocks are freed")


class LCKVStorageConnector(ExampleConnector):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        check_setup(vllm_config, kv_cache_config)
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.manifest = _manifest_of(vllm_config, kv_cache_config)
        self.stats = {"saved_layers": 0, "saved_bytes": 0, "saved_tokens": 0, "loaded_layers": 0,
                      "loaded_bytes": 0, "loaded_tokens": 0, "refused": 0, "local_prefills": 0, "save_s": 0.0,
                      "load_s": 0.0}
        self._manifest_written = False
        found = self._stored_manifest()
        if found is not None and self._kv_transfer_config.kv_role == "kv_consumer":
            problem = self._mismatch(found)
            if problem:
                raise KVTransferConfigError(
                    f"kv_transfer_config: the KV in {self._storage_path} was saved by another model: {problem}")

    # ---- the manifest -------------------------------------------------------------------------------------------
    def _stored_manifest(self) -> dict | None:
        path = os.path.join(self._storage_path, MANIFEST)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _mismatch(self, other: dict) -> str | None:
        for key, mine in self.manifest.items():
            if other.get(key) != mine:
                return f"{key} is {other.get(key)!r} there, {mine!r} here"
        return None

    # ---- scheduler side -----------------------------------------------------------------------------------------
    def _found_match_for_prompt(self, prompt_token_ids, mm_hashes) -> bool:
        # ExampleConnector stores a prompt under its first align(len) tokens but looks it up under align(len - 1),
        # which differ when len = 1 (mod block size): such prompts were never found.  Look up what was stored (the
        # decode instance still computes from align(len - 1) on, overwriting the extra block it loaded).
        n = align_to_block_size(len(prompt_token_ids), self._block_size)
        folder = self._generate_foldername_debug(torch.tensor(prompt_token_ids)[:n], mm_hashes, create_folder=False)
        return os.path.exists(folder)

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        n, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        if self._kv_transfer_config.kv_role != "kv_consumer":
            return n, load_async
        if n and n > 0:
            found = self._stored_manifest()
            problem = self._mismatch(found) if found is not None else "no manifest"
            if problem:
                self.stats["refused"] += 1
                logger.error("LCKV KV transfer for request %s refused (%s): prefilling it locally",
                             request.request_id, problem)
                return 0, False
        elif num_computed_tokens == 0:
            self.stats["local_prefills"] += 1
            logger.warning("LCKV KV transfer: nothing stored for request %s (%d prompt tokens): prefilling it "
                           "locally", request.request_id, len(request.prompt_token_ids or []))
        return n, load_async

    # ---- worker side ----------------------------------------------------------------------------------------------
    def start_load_kv(self, forward_context, **kwargs) -> None:
        """ExampleConnector's load, over producers only (a consumer's `kv_cache` is its producer's tensor)."""
        producers = {name: layer for name, layer in forward_context.no_compile_layers.items()
                     if getattr(layer, "kv_cache", None) is not None
                     and getattr(layer, "kv_sharing_target_layer_name", None) is None}
        t = time.perf_counter()
        super().start_load_kv(SimpleNamespace(attn_metadata=forward_context.attn_metadata,
                                              no_compile_layers=producers), **kwargs)
        self.stats["load_s"] += time.perf_counter() - t
        for request in self._get_connector_metadata().requests:
            if not request.is_store:
                n = len(request.slot_mapping)
                self.stats["loaded_tokens"] += n
                self.stats["loaded_layers"] += len(producers)
                self.stats["loaded_bytes"] += sum(n * _slot_bytes(layer.kv_cache) for layer in producers.values())

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        """Called by the model once per producer per step, after its segment's last pass."""
        t = time.perf_counter()
        super().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)
        self.stats["save_s"] += time.perf_counter() - t
        stores = [r for r in self._get_connector_metadata().requests if r.is_store]
        if not stores:
            return
        self.stats["saved_layers"] += len(stores)
        n = sum(len(r.slot_mapping) for r in stores)
        self.stats["saved_bytes"] += n * _slot_bytes(kv_layer)
        if layer_name.endswith(f"layers.{self.manifest['producers'][0]}.self_attn.attn"):
            self.stats["saved_tokens"] += n  # once per step, not once per producer
        if not self._manifest_written:
            os.makedirs(self._storage_path, exist_ok=True)
            tmp = os.path.join(self._storage_path, f".{MANIFEST}.{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(self.manifest, f, indent=2)
            os.replace(tmp, os.path.join(self._storage_path, MANIFEST))
            self._manifest_written = True


def _slot_bytes(kv_cache) -> int:
    """Bytes of one token's K and V in a layer's pages (`[blocks, heads, block_size, 2 * head_dim]` view)."""
    return kv_cache.shape[1] * kv_cache.shape[3] * kv_cache.element_size()
