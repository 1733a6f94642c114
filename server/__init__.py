"""lckv-serve: an OpenAI-compatible FastAPI server on vLLM's AsyncLLM (issue 4)."""
