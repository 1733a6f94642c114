"""The serving engine side of the plugin: what runs inside vLLM's worker for every step.

`model.py` (LCKVLlamaForCausalLM: layers, consumer binding, segments), `prefill.py` (the iterative prefill of cyclic
segments: passes, adaptive stop, telemetry), `resume.py` (re-encoding after preemption), `weights.py` (checkpoint
names -> vLLM's parameters), `attention/` (the backend, the per-step object and the attention paths) and
`vllm_patches.py` (every reach into vLLM internals).  All of it derives from `lckv_vllm.plan` and `lckv_vllm.settings`.
"""
