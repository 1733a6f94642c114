"""lckv-serve against a hostile client: malformed, deeply nested, oversized, wrongly typed and wrongly encoded bodies,
strange characters, non-JSON content types, schema-driven fuzzing, a disconnect storm, secrets in the log, and a
model failure injected into the engine (the server must answer 500, report 503 on /health and exit with status 70).

One lckv-serve subprocess (tiny-w2, API key from the environment, the fault-injection hook armed on a token pattern
no other test sends) serves the module; the fault-injection test kills its engine, so it runs last.  A few checks
run in-process on a stand-in engine (server_utils.StubEngine).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import threading
from pathlib import Path

import httpx
import pytest

from server_utils import StubEngine, lckv_serve, parse_metrics, server_env

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-hostile-7f3a9c1e5b2d4680"
SECRET = "CANARY-d41d8cd98f00"  # sent inside request bodies and wrong keys; must never reach the log
MODEL = "tiny-w2"
MAX_MODEL_LEN = 256
MAX_BODY = 65536
MAX_N = 4
MAX_TOKENS = 128
FAULT = [29876, 17, 29876, 17, 29876]  # a prompt containing these token ids makes the model runner fail
C = "/v1/completions"
CH = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "loadtests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("lckv-serve-hostile") / "server.log"
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY), "--max-n", str(MAX_N),
            "--max-tokens-limit", str(MAX_TOKENS), "--engine-death-grace", "5",
            "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(64 << 20),
            "--block-size", "16"]
    env = server_env(LCKV_API_KEY=API_KEY, LCKV_SERVE_FAULT_TOKENS=",".join(map(str, FAULT)))
    yield from lckv_serve(model_path, log, MODEL, args, env)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def metrics(http) -> dict[str, float]:
    return parse_metrics(http.get("/metrics").text)


def good_request(http) -> None:
    r = http.post(C, json={"model": MODEL, "prompt": "ok", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["type"]
    return err


# ---- start-up ------------------------------------------------------------------------------------------------------


def test_startup_says_it_listens_on_loopback_only(server):
    from lckv_vllm.server.cli import parse_args

    assert parse_args(["some-model"]).host == "127.0.0.1"
    log = server.log.read_text(errors="replace")
    assert "bound 127.0.0.1:" in log and "loopback only: other machines cannot connect" in log
    assert "API key required on /v1/*" in log


# ---- hostile bodies ------------------------------------------------------------------------------------------------

OK = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _deep(n: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * n + close * n


HOSTILE = [
    # (id, path, request kwargs, status, error code or None)
    # nesting
    ("deep-array-30k", C, {"content": b'{"prompt": ' + _deep(30_000) + b"}", "headers": JSON}, 400, "invalid_json"),
    ("deep-object-10k", C, {"content": b'{"prompt": "hi", "x": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}",
                            "headers": JSON}, 400, "invalid_json"),
    ("deep-array-in-unknown-field", C, {"content": b'{"prompt": "hi", "extra": ' + _deep(300) + b"}",
                                        "headers": JSON}, 400, "invalid_json"),
    ("deep-tool-choice", CH, {"content": b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": '
                                         + b'{"a":' * 5000 + b"1" + b"}" * 5001, "headers": JSON}, 400,
     "invalid_json"),
    # encodings and escapes
    ("unpaired-high-surrogate-prompt", C, {"content": b'{"prompt": "a\\ud800b", "max_tokens": 2}', "headers": JSON},
     400, "invalid_json"),
    ("unpaired-low-surrogate-stop", C, {"content": b'{"prompt": "ab", "stop": ["\\udc00' + SECRET.encode() + b'"]}',
                                        "headers": JSON}, 400, "invalid_json"),
    ("surrogate-in-model-name", C, {"content": b'{"prompt": "ab", "model": "\\udfff"}', "headers": JSON}, 400,
     "invalid_json"),
    ("surrogate-in-chat-content", CH, {"content": b'{"messages": [{"role": "user", "content": "\\ud83d"}]}',
                                       "headers": JSON}, 400, "invalid_json"),
    ("surrogate-in-logit-bias-key", C, {"content": b'{"prompt": "ab", "logit_bias": {"\\ud800": 1}}',
                                        "headers": JSON}, 400, "invalid_json"),
    ("latin-1-body", C, {"content": '{"prompt": "caf\xe9 %s"}'.encode("latin-1") % SECRET.encode(),
                         "headers": JSON}, 400, "invalid_json"),
    ("utf-16-body", C, {"content": json.dumps(OK).encode("utf-16"), "headers": JSON}, 400, "invalid_json"),
    ("utf-8-encoded-surrogate", C, {"content": b'{"prompt": "\xed\xa0\x80"}', "headers": JSON}, 400,
     "invalid_json"),
    ("overlong-utf-8", C, {"content": b'{"prompt": "\xc0\xaf"}', "headers": JSON}, 400, "invalid_json"),
    ("bad-escape", C, {"content": b'{"prompt": "\\x41"}', "headers": JSON}, 400, "invalid_json"),
    ("nan-literal", C, {"content": b'{"prompt": "hi", "temperature": NaN}', "headers": JSON}, 400, None),
    ("infinity-literal", C, {"content": b'{"prompt": "hi", "top_p": Infinity}', "headers": JSON}, 400, None),
    ("float-overflow", C, {"content": b'{"prompt": "hi", "temperature": 1e400}', "headers": JSON}, 400, None),
    ("5000-digit-integer", C, {"content": b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
                               "headers": JSON}, 400, "invalid_json"),
    ("trailing-garbage", C, {"content": _j(OK) + b" {}", "headers": JSON}, 400, "invalid_json"),
    ("empty-body", C, {"content": b"", "headers": JSON}, 400, "invalid_json"),
    ("null-body", C, {"content": b"null", "headers": JSON}, 400, "invalid_json"),
    ("string-body", C, {"content": _j(SECRET), "headers": JSON}, 400, "invalid_json"),
    # content types
    ("text-plain", C, {"content": _j(OK), "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ("form-urlencoded", C, {"content": b"prompt=" + SECRET.encode(),
                            "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415,
     "unsupported_media_type"),
    ("multipart", C, {"files": {"prompt": ("p.txt", SECRET.encode())}}, 415, "unsupported_media_type"),
    ("json-latin-1-charset", C, {"content": _j(OK), "headers": {"Content-Type": "application/json; charset=latin-1"}},
     415, "unsupported_media_type"),
    ("octet-stream", CH, {"content": _j({"messages": [{"role": "user", "content": "x"}]}),
                          "headers": {"Content-Type": "application/octet-stream"}}, 415, "unsupported_media_type"),
    # wrong types
    ("max-tokens-true", C, {"json": {**OK, "max_tokens": True}}, 400, "invalid_value"),
    ("max-tokens-numeric-string", C, {"json": {**OK, "max_tokens": "2"}}, 400, "invalid_value"),
    ("max-tokens-fraction", C, {"json": {**OK, "max_tokens": 2.5}}, 400, "invalid_value"),
    ("n-list", C, {"json": {**OK, "n": []}}, 400, "invalid_value"),
    ("stream-string", C, {"json": {**OK, "stream": "true"}}, 400, "invalid_value"),
    ("temperature-string", C, {"json": {**OK, "temperature": "0.5"}}, 400, "invalid_value"),
    ("prompt-object", C, {"json": {"prompt": {"text": SECRET}}}, 400, "invalid_value"),
    ("prompt-bools", C, {"json": {"prompt": [True, False]}}, 400, "invalid_value"),
    ("stop-ints", C, {"json": {**OK, "stop": [1, 2]}}, 400, "invalid_value"),
    ("logit-bias-list", C, {"json": {**OK, "logit_bias": [1, 2]}}, 400, "invalid_value"),
    ("logit-bias-word-key", C, {"json": {**OK, "logit_bias": {SECRET: 1}}}, 400, None),
    ("messages-string", CH, {"json": {"messages": SECRET}}, 400, "invalid_value"),
    ("message-content-int", CH, {"json": {"messages": [{"role": "user", "content": 5}]}}, 400, "invalid_value"),
    ("stream-options-string", C, {"json": {**OK, "stream": True, "stream_options": "yes"}}, 400, "invalid_value"),
    ("seed-2-to-64", C, {"json": {**OK, "seed": 2**64}}, 400, "invalid_value"),
    ("top-k-2-to-40", C, {"json": {**OK, "top_k": 2**40}}, 400, "invalid_value"),
    ("stop-token-id-huge", C, {"json": {**OK, "stop_token_ids": [10**30]}}, 400, None),
    # sizes and caps
    ("oversized-body", C, {"json": {"prompt": SECRET * (MAX_BODY // len(SECRET) + 1)}}, 413, "request_too_large"),
    ("oversized-chunked-body", C, {"content": iter([b" " * 8192] * (MAX_BODY // 8192 + 2)), "headers": JSON}, 413,
     "request_too_large"),
    ("too-many-prompts", C, {"json": {"prompt": ["a"] * 257, "max_tokens": 1}}, 400, "invalid_value"),
    ("n-over-cap", C, {"json": {**OK, "n": MAX_N + 1}}, 400, None),
    ("max-tokens-over-cap", C, {"json": {**OK, "max_tokens": MAX_TOKENS + 1}}, 400, None),
    ("chat-max-completion-tokens-over-cap", CH, {"json": {"messages": [{"role": "user", "content": "x"}],
                                                          "max_completion_tokens": MAX_TOKENS + 1}}, 400, None),
    ("prompt-over-context", C, {"json": {"prompt": "hello " * 400, "max_tokens": 1}}, 400,
     "context_length_exceeded"),
    ("long-model-name", C, {"json": {**OK, "model": SECRET * 2000}}, 404, "model_not_found"),
    ("unknown-model", C, {"json": {**OK, "model": SECRET}}, 404, "model_not_found"),
    # keys
    ("wrong-key-with-secret", C, {"json": OK, "headers": {"Authorization": f"Bearer {SECRET}"}}, 401,
     "invalid_api_key"),
    ("key-with-latin-1-bytes", C, {"json": OK, "headers": {"Authorization": b"Bearer caf\xe9"}}, 401,
     "invalid_api_key"),
    ("key-prefix", C, {"json": OK, "headers": {"Authorization": f"Bearer {API_KEY[:-1]}"}}, 401, "invalid_api_key"),
    ("key-extended", C, {"json": OK, "headers": {"Authorization": f"Bearer {API_KEY}x"}}, 401, "invalid_api_key"),
    # accepted, not errors: these must work
    ("no-content-type", C, {"content": _j({**OK, "max_tokens": 1})}, 200, None),
    ("json-utf-8-charset", C, {"content": _j(OK), "headers": {"Content-Type": "application/json; charset=UTF-8"}},
     200, None),
    ("vendor-json", C, {"content": _j(OK), "headers": {"Content-Type": "application/vnd.lckv+json"}}, 200, None),
    ("utf-8-bom", C, {"content": b"\xef\xbb\xbf" + _j(OK), "headers": JSON}, 200, None),
    ("integral-float", C, {"json": {**OK, "max_tokens": 2.0, "n": 1.0}}, 200, None),
    ("paired-surrogates", C, {"content": b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}', "headers": JSON},
     200, None),
    ("duplicate-keys-last-wins", C, {"content": b'{"prompt": 5, "prompt": "hi", "max_tokens": 1}', "headers": JSON},
     200, None),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_body(http, case):
    name, path, kwargs, status, code = case
    kwargs = dict(kwargs)
    if name == "oversized-chunked-body":
        kwargs["content"] = iter([b" " * 8192] * (MAX_BODY // 8192 + 2))  # a fresh iterator per run
    r = http.post(path, **kwargs)
    if status == 200:
        assert r.status_code == 200, r.text[:500]
    else:
        err = assert_openai_error(r, status)
        if code is not None:
            assert err["code"] == code, err
        assert len(err["message"]) < 2100, "error messages are clipped"
        if name == "long-model-name":
            assert len(err["message"]) < 300
        if name.startswith(("deep-",)):
            assert "nests" in err["message"]
        if "surrogate" in name and "utf-8" not in name:
            assert "surrogate" in err["message"]
        if status == 415:
            assert "application/json" in err["message"] or "UTF-8" in err["message"]
    good_request(http)


STRANGE = [
    ("nul", "a\x00b\x00"),
    ("control-chars", "".join(chr(c) for c in range(1, 32))),
    ("del-and-c1", "\x7f\x80\x9f"),
    ("bidi-override", "abc\u202edef\u202c\u2066x\u2069"),
    ("zero-width", "a\u200b\u200c\u200d\ufeffb"),
    ("combining-pile", "e" + "\u0301" * 200),
    ("noncharacters", "\ufffe\uffff\U0001fffe\U0010ffff"),
    ("private-use", "\ue000\U000f0000"),
    ("line-separators", "one\u2028two\u2029three\r\nfour\rfive"),
    ("emoji-zwj", "\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f3f3\ufe0f\u200d\U0001f308"),
    ("replacement-char", "\ufffd\ufffd"),
    ("cjk-and-rtl", "\u4f60\u597d \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627"),
    ("long-word", "a" * 1600),  # one "word" of ~200 tokens
    ("json-lookalike", '"}], "prompt": "injected\\u0000'),
]


@pytest.mark.parametrize("case", STRANGE, ids=[c[0] for c in STRANGE])
def test_strange_characters_in_prompts_and_stop_strings(http, tokenizer, case):
    name, text = case
    r = http.post(C, json={"model": MODEL, "prompt": text, "max_tokens": 3, "echo": True, "ignore_eos": True})
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["choices"][0]["text"].startswith(text)  # echoed back exactly, NUL and all
    assert body["usage"]["prompt_tokens"] == len(tokenizer(text).input_ids)
    # as a stop string, plain and streamed
    r = http.post(C, json={"model": MODEL, "prompt": "hello", "max_tokens": 3, "stop": [text[:50]]})
    assert r.status_code == 200, r.text[:500]
    with http.stream("POST", C, json={"model": MODEL, "prompt": text[:200], "max_tokens": 3, "stream": True,
                                      "stop": [text[:20], "\x00"]}) as s:
        events = [line for line in s.iter_lines() if line]
    assert s.status_code == 200 and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:]) for e in events[:-1])
    # in a chat message and a chat stop string
    r = http.post(CH, json={"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 3,
                            "stop": text[:30]})
    assert r.status_code == 200, r.text[:500]
    good_request(http)


# ---- the OpenAPI document and fuzzing ------------------------------------------------------------------------------


def test_openapi_document_describes_this_server(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()  # no key needed, like /health
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])
    req = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert req["n"]["maximum"] == MAX_N
    assert [x["maximum"] for x in req["max_tokens"]["anyOf"] if x.get("type") == "integer"] == [MAX_TOKENS]
    ids = [x for x in req["prompt"]["anyOf"] if x.get("type") == "array" and x["items"].get("type") == "integer"]
    assert ids[0]["items"]["maximum"] == 31999
    post = doc["paths"]["/v1/completions"]["post"]
    assert post["security"] == [{"bearerAuth": []}]
    assert {"200", "400", "401", "404", "413", "415", "500", "503"} <= set(post["responses"])
    assert "text/event-stream" in post["responses"]["200"]["content"]


def test_fuzz_openapi_no_5xx_and_responses_conform(server, http):
    fuzz = _load("fuzz")
    report = fuzz.fuzz(server.url, API_KEY, examples=30, seed=0, log=lambda *_: None)
    summary = {op: {m: (v["cases"], v["statuses"]) for m, v in modes.items()}
               for op, modes in report["operations"].items()}
    assert report["failures"] == [], json.dumps(report["failures"][:5], indent=1)
    assert len(report["operations"]) == 7 and report["cases"] >= 200, summary
    for op in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert report["operations"][op]["positive"]["statuses"].get("200"), summary
    assert not any(s.startswith("5") for modes in report["operations"].values() for m in modes.values()
                   for s in m["statuses"]), summary
    assert fuzz.after_check(server.url, API_KEY, MODEL) == {"health_status": 200, "normal_request_ok": True}


# ---- disconnect storm ----------------------------------------------------------------------------------------------


def test_disconnect_storm_leaves_the_engine_empty(server, http):
    storm = _load("storm")
    report = storm.storm(server.url, API_KEY, MODEL, lambda: metrics(http), requests=200, concurrency=64, seed=0,
                         max_tokens=MAX_TOKENS, settle=30)
    assert report["requests"] == 200 and not report["client_errors"], report
    assert report["cancelled"] >= 190, report  # all but a few are cut off before [DONE]
    assert set(report["points"]) == set(storm.POINTS), report
    assert report["after"] == {"lckv_requests_running": 0, "lckv_requests_waiting": 0, "lckv_requests_unfinished": 0,
                               "lckv_sequences_admitted": 0, "lckv_kv_usage_ratio": 0, "lckv_engine_healthy": 1}, \
        report
    assert report["server_5xx_responses"] == 0, report
    assert report["normal_request_status"] == 200 and report["normal_request_tokens"] == 8, report


# ---- secrets -------------------------------------------------------------------------------------------------------


def test_log_has_no_key_no_body_secrets_no_tracebacks(server, http):
    # one more of each kind of failure that carries the canary, with the access log's view of it
    http.post(C, json={**OK, "model": SECRET})
    http.post(C, content=b'{"prompt": "' + SECRET.encode() + b'", ', headers=JSON)
    http.post(C, json=OK, headers={"Authorization": f"Bearer {SECRET}"})
    log = server.log.read_text(errors="replace")
    assert API_KEY not in log
    assert SECRET not in log
    assert "Traceback" not in log and "unhandled" not in log, log[-3000:]


def test_unhandled_error_is_500_and_the_log_withholds_its_message(tokenizer, caplog):
    """A bug (here: the tokenizer raising with the prompt in its message) answers 500 in OpenAI's shape and logs
    the exception's type and stack, not its message."""
    from lckv_vllm.server.app import create_app
    from lckv_vllm.server.engine import EngineFrontend

    class LeakyTokenizer:
        chat_template = None

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text, **kw):
            raise KeyError(f"cannot encode {text}")

    async def run():
        fe = EngineFrontend(StubEngine(LeakyTokenizer()), served_model_names=[MODEL], model_path="stub")
        app = create_app(fe, api_key=API_KEY)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t", headers=headers) as c:
            r = await c.post(C, json={"model": MODEL, "prompt": SECRET, "max_tokens": 1})
            err = assert_openai_error(r, 500)
            assert err["code"] == "internal_error" and SECRET in err["message"]  # the client may see its own data
            r = await c.post(C, json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1})
            assert r.status_code == 200  # and the app goes on
            m = parse_metrics((await c.get("/metrics")).text)
            assert m['lckv_requests_total{endpoint="/v1/completions",status="500"}'] == 1
        fe.shutdown()

    with caplog.at_level(logging.INFO, logger="lckv_vllm.server"):
        asyncio.run(run())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "unhandled KeyError on POST /v1/completions" in text and "encode" in text  # the stack is there
    assert SECRET not in text and API_KEY not in text


def test_api_key_comparison():
    from lckv_vllm.server.app import GuardMiddleware
    from lckv_vllm.server.metrics import ServerMetrics

    g = GuardMiddleware(None, metrics=ServerMetrics(), api_key="clé-secrète", max_body_bytes=1024)
    assert g.key_matches("clé-secrète".encode())
    for wrong in (b"", b"cl", "clé-secrète ".encode(), "clé-secrètf".encode(), "clé-secrète".encode("latin-1"),
                  b"x" * 10_000):
        assert not g.key_matches(wrong)
    assert g._key_digest != "clé-secrète".encode()  # only the digest is kept for comparison


def test_content_type_rules():
    from lckv_vllm.server.app import check_content_type
    from lckv_vllm.server.errors import APIError

    for ok in (None, "", "application/json", "Application/JSON; charset=utf-8", 'application/json;charset="UTF8"',
               "application/problem+json"):
        check_content_type(ok)
    for bad in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                "application/json; charset=iso-8859-1", "text/json", "application/jsonx", "*/*"):
        with pytest.raises(APIError) as e:
            check_content_type(bad)
        assert e.value.status == 415


# ---- fault injection (last: it stops the server) -------------------------------------------------------------------


def test_model_failure_gives_500_then_health_503_then_exit_70(server, http, tokenizer):
    assert http.get("/health").status_code == 200
    streamed: dict = {"events": []}
    running = threading.Event()

    def stream():  # a request already running when the engine fails
        body = {"model": MODEL, "prompt": "a long answer", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            with c.stream("POST", C, json=body) as r:
                streamed["status"] = r.status_code
                for line in r.iter_lines():
                    if line:
                        streamed["events"].append(line)
                        running.set()

    t = threading.Thread(target=stream)
    t.start()
    assert running.wait(30)  # its first tokens have arrived; ~MAX_TOKENS more to go
    prompt = tokenizer("before").input_ids + FAULT + tokenizer("after", add_special_tokens=False).input_ids
    r = http.post(C, json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "stop": [SECRET]})
    err = assert_openai_error(r, 500)
    assert err["type"] == "server_error" and err["code"] in ("engine_dead", "engine_error"), err
    # /health says so (within --engine-death-grace), and new requests get 500 in OpenAI's shape
    health = httpx.get(server.url + "/health", timeout=10)
    assert_openai_error(health, 503)
    assert parse_metrics(httpx.get(server.url + "/metrics", timeout=10).text)["lckv_engine_healthy"] == 0
    assert_openai_error(http.post(C, json=OK), 500)
    t.join(30)
    assert streamed["status"] == 200 and streamed["events"][-1] == "data: [DONE]"
    assert json.loads(streamed["events"][-2][6:])["error"]["code"] == "engine_dead"
    # then the server exits with 70 for its supervisor, by itself
    rc = server.proc.wait(90)
    log = server.log.read_text(errors="replace")
    assert rc == 70, log[-3000:]
    assert "exiting with status 70" in log and "injected fault" in log
    assert SECRET not in log and API_KEY not in log  # vLLM's dump of the failed batch is withheld
