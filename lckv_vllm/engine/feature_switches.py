"""Which vLLM switches a configuration turns on, read from vLLM's `VllmConfig`: the detectors of the feature matrix
(`features.py`).  Each returns the user's setting in words when the switch is on, else None.  These read vLLM's
config layout, so they are what to re-check when the pinned vLLM moves.
"""

from __future__ import annotations

_FP8_PAGES = ("fp8", "fp8_e4m3", "fp8_e5m2")


def kv_cache_dtype(cfg) -> str | None:
    """A page dtype other than the model's that is not one of the fp8 formats (`kv_cache_fp8`)."""
    import torch

    dtype = cfg.cache_config.cache_dtype
    model = str(cfg.model_config.dtype).replace("torch.", "")
    # naming the model's own dtype is the same as "auto"
    if dtype in ("auto", model, *_FP8_PAGES) or (dtype == "float" and cfg.model_config.dtype == torch.float32):
        return None
    return f"kv_cache_dtype={dtype!r}"


def kv_cache_fp8(cfg) -> str | None:
    dtype = cfg.cache_config.cache_dtype
    return f"kv_cache_dtype={dtype!r}" if dtype in _FP8_PAGES else None


def kv_fp8_parallel(cfg) -> str | None:
    if kv_cache_fp8(cfg) is None:
        return None
    pc = cfg.parallel_config
    if pc.tensor_parallel_size > 1 or pc.pipeline_parallel_size > 1:
        return (f"{kv_cache_fp8(cfg)} with tensor_parallel_size={pc.tensor_parallel_size}, "
                f"pipeline_parallel_size={pc.pipeline_parallel_size}")
    return None


def kv_skip_layers(cfg) -> str | None:
    skip = cfg.cache_config.kv_cache_dtype_skip_layers
    return f"kv_cache_dtype_skip_layers={list(skip)!r}" if skip else None


def _spec_method(cfg) -> str | None:
    spec = cfg.speculative_config
    return None if spec is None else str(spec.method)


def speculative(methods: tuple[str, ...] | None):
    """Detector for speculative decoding with one of `methods` (None: any method not covered by another row)."""

    def detect(cfg) -> str | None:
        method = _spec_method(cfg)
        if method is None:
            return None
        if methods is None:
            if method in _SPEC_ROWS:
                return None
        elif method not in methods:
            return None
        return f"speculative_config method={method!r}"

    return detect


SPEC_NGRAM = ("ngram",)
SPEC_UNTESTED = ("ngram_gpu", "suffix")
SPEC_DRAFT = ("draft_model",)
_SPEC_ROWS = SPEC_NGRAM + SPEC_UNTESTED + SPEC_DRAFT


def lora(cfg) -> str | None:
    return None if cfg.lora_config is None else "enable_lora"


def lora_combined(cfg) -> str | None:
    """LoRA together with what the suite has not run it with: several ranks, speculation, a GPU."""
    if lora(cfg) is None:
        return None
    others = [x for x in (tensor_parallel(cfg), pipeline_parallel(cfg), _spec_method(cfg) and
                          f"speculative_config method={_spec_method(cfg)!r}") if x]
    if cfg.device_config.device_type != "cpu":
        others.append(f"device={cfg.device_config.device_type!r}")
    return f"enable_lora with {', '.join(others)}" if others else None


def quantization(cfg) -> str | None:
    q = cfg.model_config.quantization
    return None if q is None else f"quantization={q!r}"


def _pooling(cfg) -> str | None:
    mc = cfg.model_config
    if mc.runner_type == "pooling" or mc.convert_type not in (None, "none"):
        return f"runner={mc.runner_type!r} convert={mc.convert_type!r}"
    return None


def pooling(cfg) -> str | None:
    """Embeddings: a pooling runner over the model's hidden states (`--runner pooling` resolves to convert 'embed')."""
    return _pooling(cfg) if cfg.model_config.convert_type == "embed" else None


def pooling_other(cfg) -> str | None:
    """Pooling conversions that add a head (classify, reward, ...)."""
    return _pooling(cfg) if cfg.model_config.convert_type != "embed" else None


def sleep_mode(cfg) -> str | None:
    return "enable_sleep_mode" if cfg.model_config.enable_sleep_mode else None


def data_parallel(cfg) -> str | None:
    dp = cfg.parallel_config.data_parallel_size
    return f"data_parallel_size={dp}" if dp > 1 else None


def tensor_parallel(cfg) -> str | None:
    tp = cfg.parallel_config.tensor_parallel_size
    return f"tensor_parallel_size={tp}" if tp > 1 else None


def pipeline_parallel(cfg) -> str | None:
    pp = cfg.parallel_config.pipeline_parallel_size
    return f"pipeline_parallel_size={pp}" if pp > 1 else None


def storage_connector(cfg) -> str | None:
    kt = cfg.kv_transfer_config
    on = kt is not None and kt.kv_connector == "LCKVStorageConnector"
    return "kv_connector='LCKVStorageConnector'" if on else None


def storage_connector_tp(cfg) -> str | None:
    on = storage_connector(cfg)
    return on and (tp := tensor_parallel(cfg)) and f"{on} with {tp}"


def other_connector(cfg) -> str | None:
    kt = cfg.kv_transfer_config
    if kt is None or kt.kv_connector in (None, "LCKVStorageConnector"):
        return None
    return f"kv_connector={kt.kv_connector!r}"


def kv_offloading(cfg) -> str | None:
    size = cfg.cache_config.kv_offloading_size
    return f"kv_offloading_size={size}" if size else None


def fast_prefill(cfg) -> str | None:
    return "kv_sharing_fast_prefill" if cfg.cache_config.kv_sharing_fast_prefill else None


def _on_gpu() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def attention_backend(cfg) -> str | None:
    """A backend named with `--attention-backend` (or VLLM_ATTENTION_BACKEND): LCKV layers never use vLLM's."""
    backend = getattr(cfg.attention_config, "backend", None)
    return None if backend is None else f"attention_backend={getattr(backend, 'name', backend)!r}"


def async_scheduling(cfg) -> str | None:
    """`--async-scheduling` asked for on a GPU.  vLLM turns it off on CPU itself; its GPU default (None -> on) is
    turned off by the config hook after the guard, so only an explicit request is seen here."""
    return "async_scheduling=True" if cfg.scheduler_config.async_scheduling and _on_gpu() else None


def prompt_embeds(cfg) -> str | None:
    return "enable_prompt_embeds" if cfg.model_config.enable_prompt_embeds else None
