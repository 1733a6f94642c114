"""`lckv-serve MODEL [options] [vLLM engine options]`: start the engine and serve the OpenAI API over HTTP.

Server options are ours (--host, --port, --api-key, --max-queued-requests, ...); every other option is one of vLLM's
engine arguments (`AsyncEngineArgs.add_cli_args`: --dtype, --max-model-len, --served-model-name, --block-size,
--kv-cache-memory-bytes, --max-num-seqs, ...), parsed by vLLM's own parser, so they mean what they mean to
`vllm serve`.  `lckv-serve --help` lists them all.

Start-up order: bind the socket (a busy port fails in a second, not after the engine's start-up), start the engine,
then uvicorn.  SIGTERM or SIGINT: stop accepting, let running requests finish (up to --graceful-timeout seconds),
shut the engine down, exit 0.

If the engine stops (an exception in the model, its process killed): requests in flight fail with 500, /health
answers 503 for --engine-death-grace seconds, then the server shuts down and exits with status ENGINE_DEAD_EXIT (70)
so that a supervisor (systemd `Restart=on-failure`, Kubernetes, docker `--restart`) starts a fresh one.  vLLM's
engine cannot drop one failed batch and go on, so restarting is the only recovery.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys

logger = logging.getLogger("lckv_vllm.server")

DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise: the server has no TLS and an optional key
ENGINE_DEAD_EXIT = 70  # EX_SOFTWARE: the engine stopped under the server; a supervisor should restart it


class _WithholdBatchDump(logging.Filter):
    """vLLM's engine core logs the batch of a step that failed: request ids and lengths (not prompts), but also each
    request's sampling parameters, whose stop strings and logit_bias come from request bodies.  That record is
    replaced by a note; the error itself and its traceback are still logged.  `_withhold_batch_dump` installs it in
    this process and in the engine's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Dumping scheduler output"):
            record.msg = "(the failed step's scheduler output is withheld by lckv-serve: it holds request parameters)"
            record.args = ()
        return True


def _withhold_batch_dump() -> str | None:
    """Install `_WithholdBatchDump` here and in the engine's processes.  vLLM starts its engine core by `spawn` on
    CPU, so a filter added in this process would not reach it; vLLM's logging set-up in every process reads
    VLLM_LOGGING_CONFIG_PATH, so point that at vLLM's own default configuration plus the filter on its handler.
    A configuration of the user's (VLLM_LOGGING_CONFIG_PATH already set) is left alone.  Returns the file, to be
    removed when the server exits (an engine process may start late and read it)."""
    import copy
    import json
    import tempfile

    import vllm.envs as envs
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    logging.getLogger("vllm.logging_utils.dump_input").addFilter(_WithholdBatchDump())
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or not envs.VLLM_CONFIGURE_LOGGING:
        return None
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    level = envs.VLLM_LOGGING_LEVEL
    config["filters"] = {"lckv_withhold_batch": {"()": f"{__name__}._WithholdBatchDump"}}
    handler = config["handlers"]["vllm"]
    handler.update(filters=["lckv_withhold_batch"], level=level, stream=envs.VLLM_LOGGING_STREAM)
    for formatter in config["formatters"].values():
        formatter["log_level"] = level
    config["loggers"]["vllm"]["level"] = level
    with tempfile.NamedTemporaryFile("w", prefix="lckv-serve-logging-", suffix=".json", delete=False) as f:
        json.dump(config, f)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = f.name
    return f.name


class _Terminated(BaseException):
    """SIGTERM/SIGINT arrived before uvicorn took over signal handling (during the engine's start-up)."""


def make_parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="lckv-serve",
        description="OpenAI-compatible server for LCKV and other cross-layer KV-sharing models on vLLM's AsyncLLM. "
                    "Options other than the server options below are vLLM engine arguments.",
    )
    parser.add_argument("model_tag", metavar="MODEL", help="model directory (or a name vLLM can load)")
    srv = parser.add_argument_group("lckv-serve server options")
    srv.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1/* (default: the LCKV_API_KEY environment "
                          "variable; no key when neither is set)")
    srv.add_argument("--max-queued-requests", type=int, default=None, metavar="N",
                     help="admit at most max_num_seqs + N sequences at once (a request counts prompts x n); "
                          "beyond that answer 503 with Retry-After (default: no limit)")
    srv.add_argument("--max-body-bytes", type=int, default=4 << 20,
                     help="largest accepted request body; larger ones get 413 (default: %(default)s)")
    srv.add_argument("--max-n", type=int, default=None, metavar="N",
                     help="largest n (choices per prompt) a request may ask for (default and upper bound: 128)")
    srv.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                     help="largest max_tokens a request may ask for; a request without max_tokens gets at most "
                          "this many (default: the context length)")
    srv.add_argument("--engine-death-grace", type=float, default=2.0, metavar="SECONDS",
                     help="when the engine stops, keep answering (503 on /health, 500 on requests) this long, "
                          f"then exit with status {ENGINE_DEAD_EXIT} (default: %(default)s)")
    srv.add_argument("--graceful-timeout", type=float, default=10.0,
                     help="seconds to let running requests finish on SIGTERM (default: %(default)s)")
    srv.add_argument("--uvicorn-log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log level of the HTTP server and of lckv-serve's own messages (vLLM's: --log-level)")
    srv.add_argument("--access-log", action="store_true", help="log every HTTP request")
    srv.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                     help="LoRA adapters (PEFT folders) served under model names of their own, as `vllm serve "
                          "--lora-modules` does; needs --enable-lora")
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def parse_args(argv: list[str] | None = None):
    parser = make_parser()
    args = parser.parse_args(argv)
    # an empty key means "no key" either way, never "the empty string is the key"
    args.api_key = args.api_key or os.environ.get("LCKV_API_KEY") or None
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        parser.error("--max-queued-requests must be >= 0")
    if args.max_body_bytes < 1024:
        parser.error("--max-body-bytes must be at least 1024")
    if args.max_n is not None and not 1 <= args.max_n <= 128:
        parser.error("--max-n must be between 1 and 128")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        parser.error("--max-tokens-limit must be >= 1")
    if args.engine_death_grace < 0:
        parser.error("--engine-death-grace must be >= 0")
    args.model = args.model_tag  # vLLM's engine args take the model as --model; ours is positional
    args.lora_modules = _lora_modules(parser, args)
    return args


def _lora_modules(parser, args) -> dict[str, str]:
    """--lora-modules NAME=PATH ... -> {name: path}, each checked before the engine starts."""
    if not args.lora_modules:
        return {}
    if not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    found: dict[str, str] = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--lora-modules: {item!r} is not NAME=PATH")
        if name in found:
            parser.error(f"--lora-modules: the name {name!r} is given twice")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            parser.error(f"--lora-modules: {path!r} (for {name!r}) has no adapter_config.json (a PEFT adapter folder)")
        found[name] = path
    return found


def reachability(host: str) -> str:
    """Who can connect to `host`, in words, for the start-up log."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "a host name: reachable wherever it resolves to a non-loopback address"
    if ip.is_loopback:
        return "loopback only: other machines cannot connect (--host 0.0.0.0 opens it to them)"
    if ip.is_unspecified:
        return "all interfaces: other machines can connect"
    return "this interface: other machines on its network can connect"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def _serve(args, sock: socket.socket, state: dict) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from .faults import ENV as FAULT_ENV
    from .faults import fault_tokens_from_env
    from .worker_ext import EXTENSION

    engine_args = AsyncEngineArgs.from_cli_args(args)
    fault = fault_tokens_from_env()
    if engine_args.worker_extension_cls:
        if fault:
            raise SystemExit(f"lckv-serve: {FAULT_ENV} needs --worker-extension-cls for itself")
        # vLLM takes one extension class: the user's wins, and /metrics goes without the prefill telemetry
        logger.info("lckv-serve: --worker-extension-cls given: /metrics shows no prefill convergence telemetry")
    else:
        engine_args.worker_extension_cls = EXTENSION
    if fault:
        logger.warning("lckv-serve: %s is set: requests whose prompt contains token ids %s make the engine fail "
                       "(fault injection, for tests only)", FAULT_ENV, fault)
    log_config = _withhold_batch_dump()
    try:
        await _run(args, sock, state, engine_args, fault)
    finally:
        if log_config is not None:
            os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)
            os.unlink(log_config)


async def _run(args, sock: socket.socket, state: dict, engine_args, fault: list[int] | None) -> None:
    import uvicorn
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from .app import create_app
    from .engine import EngineFrontend
    from .metrics import EngineStats
    from .worker_ext import EXTENSION

    stats = EngineStats()
    engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER,
                                       stat_loggers=[stats.stat_logger_factory()])
    fe = None
    watchdog = None
    try:
        if fault:
            await engine.collective_rpc("lckv_arm_fault", args=(fault,))
        names = args.served_model_name or [args.model]
        names = [names] if isinstance(names, str) else list(names)
        fe = EngineFrontend(engine, served_model_names=names, model_path=args.model,
                            max_queued_requests=args.max_queued_requests, stats=stats, max_n=args.max_n,
                            max_tokens_limit=args.max_tokens_limit,
                            prefill_telemetry=engine_args.worker_extension_cls == EXTENSION,
                            lora_modules=args.lora_modules)
        app = create_app(fe, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
        config = uvicorn.Config(app, log_level=args.uvicorn_log_level, access_log=args.access_log,
                                timeout_graceful_shutdown=args.graceful_timeout, timeout_keep_alive=5)
        server = uvicorn.Server(config)
        kv = fe.kv
        logger.info("lckv-serve: model %s as %s on http://%s:%d (%s; %s) (KV: %d of %d layers keep KV, "
                    "%d bytes/token, capacity %s tokens)", args.model, names, args.host, args.port,
                    reachability(args.host), "API key required on /v1/*" if args.api_key else "no API key",
                    kv.producing_layers, kv.layers, kv.bytes_per_token, kv.capacity_tokens)
        if not args.api_key and not reachability(args.host).startswith("loopback"):
            logger.warning("lckv-serve: listening beyond loopback without an API key: anyone who can reach "
                           "%s:%d can use the model (set LCKV_API_KEY)", args.host, args.port)
        watchdog = asyncio.get_running_loop().create_task(_watch_engine(fe, server, args.engine_death_grace, state))
        state["serving"] = True
        await server.serve(sockets=[sock])
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if fe is not None:
            fe.shutdown()
        engine.shutdown()


async def _watch_engine(fe, server, grace: float, state: dict, interval: float = 0.25) -> None:
    """Once the engine has stopped: keep answering for `grace` seconds (/health 503), then shut the server down;
    main() then exits with ENGINE_DEAD_EXIT."""
    while not server.should_exit:
        if not fe.healthy:
            state["engine_dead"] = True
            logger.error("lckv-serve: the engine has stopped; /health answers 503, requests 500; exiting with "
                         "status %d in %.1f s so that a supervisor restarts the server", ENGINE_DEAD_EXIT, grace)
            await asyncio.sleep(grace)
            server.should_exit = True
            return
        await asyncio.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [lckv-serve] %(message)s")
    state = {"serving": False}

    def on_signal(signum, frame):
        # Before uvicorn runs, abort the start-up; afterwards uvicorn has handled the signal (it restores this
        # handler and re-raises the signal once it has shut down), so there is nothing left to do.
        if not state["serving"]:
            raise _Terminated()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        args = parse_args(argv)
        logging.getLogger("lckv_vllm.server").setLevel(args.uvicorn_log_level.upper())
        try:
            sock = _bind(args.host, args.port)
        except OSError as e:
            print(f"lckv-serve: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
            return 1
        logger.info("lckv-serve: bound %s:%d (%s); starting the engine", args.host, args.port,
                    reachability(args.host))
        asyncio.run(_serve(args, sock, state))
    except _Terminated:
        logger.info("lckv-serve: stopped by signal during start-up")
    if state.get("engine_dead"):
        logger.error("lckv-serve: exiting with status %d: the engine had stopped", ENGINE_DEAD_EXIT)
        return ENGINE_DEAD_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
