"""lckv-serve: an OpenAI-compatible FastAPI server on vLLM's AsyncLLM.

Modules: `cli` (the `lckv-serve` command: arguments, engine start-up, graceful shutdown), `app` (routes and the
ASGI guards: API key, body limit, request metrics), `completions` and `chat` (the two endpoints, plain and
streamed), `generation` (the request handling both share: checks, sampling parameters, admission, bookkeeping),
`sse` (Server-Sent Events and the client's disconnect), `engine` (the only code that talks to the engine), `schemas`
(pydantic request/response models), `errors` (OpenAI-shaped errors and status mapping), `metrics` (Prometheus,
private registry), `openapi` (the /openapi.json document), `faults` (the fault-injection hook for tests).  Importing
this package is cheap; vLLM is imported by the modules that need it.
"""

from lckv_vllm import __version__

__all__ = ["__version__"]
