"""The LCKV attention backend for vLLM (see backend.py) and its paged-attention math (impl.py)."""
