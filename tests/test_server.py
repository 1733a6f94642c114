"""lckv-serve over real HTTP: the OpenAI client, streaming, usage, errors, disconnects, concurrency, the queue limit,
metrics and SIGTERM; plus the same completion against `vllm serve`.

One lckv-serve subprocess serves the whole module (engine start-up costs ~25 s on 2 cores); the `vllm serve`
subprocess starts only for its own test, after lckv-serve has been stopped.  The engine-failure path (500) runs
in-process on a stand-in engine, since a real engine cannot be made to fail on one request only.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from server_utils import BIN, StubEngine, free_port, lckv_serve, parse_metrics, server_env, start_server

pytestmark = pytest.mark.timeout(300)

API_KEY = "test-key-123"
MODEL = "tiny-w2"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
MAX_QUEUED = 20
MAX_BODY = 65536
GREEDY: dict[str, str] = {}  # lckv-serve's greedy answers, compared with vllm serve's at the end
STRUCTURED_CONFIG = {"backend": "xgrammar", "disable_any_whitespace": True}
# a bounded schema: the string's maxLength makes the grammar close it, so even random weights finish the object
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "alive": {"type": "boolean"}},
          "required": ["name", "alive"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("lckv-serve") / "server.log"
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-queued-requests", str(MAX_QUEUED),
            "--max-body-bytes", str(MAX_BODY),
            # vLLM engine arguments, passed through
            "--dtype", "float32", "--enforce-eager", "--max-num-seqs", str(MAX_NUM_SEQS),
            "--kv-cache-memory-bytes", str(64 << 20), "--block-size", "16",
            # only structured requests read it: compact JSON (else a small model pads with whitespace until max_tokens)
            "--structured-outputs-config", json.dumps(STRUCTURED_CONFIG)]
    # the key comes from the environment here (the --api-key flag is the other way)
    yield from lckv_serve(model_path, log, MODEL, args, server_env(LCKV_API_KEY=API_KEY))


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def metrics(http) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200
    return parse_metrics(r.text)


def good_request(http) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def chat_prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)  # the template writes the BOS itself


# ---- the OpenAI client ----------------------------------------------------------------------------------------------


def test_models_list(client, model_path):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "lckv-vllm"


def test_completion_usage_matches_tokenizer(client, tokenizer):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tokenizer(prompt).input_ids
    assert r.usage.prompt_tokens == len(ids) and ids[0] == tokenizer.bos_token_id
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == len(ids) + 12
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    GREEDY[prompt] = r.choices[0].text
    # greedy is deterministic, and token ids are the same prompt as the string
    again = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text
    assert again.usage.prompt_tokens == len(ids)


def test_completion_batch_n_seed_and_stop(client, tokenizer):
    prompts = ["Once upon a time", "In a galaxy far away there was"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, n=2, temperature=1.0, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == sum(len(tokenizer(p).input_ids) for p in prompts)
    assert r.usage.completion_tokens == 4 * 5
    # a list of token-id lists is a batch too; the seed makes sampling repeatable
    ids = [tokenizer(p).input_ids for p in prompts]
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, n=2, temperature=1.0, seed=7,
                                   extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r2.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    greedy = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    stopped = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=16, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == greedy[:greedy.index(stop)]


def test_completion_logprobs_echo_penalties_min_tokens(client, tokenizer):
    prompt = "Hello world, this is"
    n_prompt = len(tokenizer(prompt).input_ids)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True,
                                  presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9,
                                  extra_body={"top_k": 20, "min_tokens": 4})
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == n_prompt + 4 == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[n_prompt:])
    assert r.usage.completion_tokens == 4


def test_completion_streaming(client, http):
    kw = dict(model=MODEL, prompt="Streaming test prompt", max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # on the wire: SSE events, the last one [DONE]
    with http.stream("POST", "/v1/completions", json={**{k: v for k, v in kw.items() if k != "extra_body"},
                                                       "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:]) or json.loads(events[-2][6:])["usage"] is None


def test_chat_and_chat_streaming(client, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == chat_prompt_len(tokenizer, messages)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    # The streamed request found the first one's prompt blocks in the prefix cache; on this random-weight cyclic
    # model (it never converges) a hit may change the encoding (docs/prefill.md), so the stream is compared with a
    # non-streamed request that sees the same cache.
    again = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == again.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens and chunks[-1].usage.completion_tokens == 8
    # logprobs in the chat shape, and n > 1
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, n=2, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    assert len(r.choices) == 2
    for ch in r.choices:
        assert len(ch.logprobs.content) == 3 and all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)


# ---- bad requests: status, OpenAI error shape, and the server still answers --------------------------------------

LONG_PROMPT = "hello " * 700  # ~700 tokens > MAX_MODEL_LEN

C = "/v1/completions"
CH = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def _chunks(n: int):
    for _ in range(n // 8192 + 1):
        yield b" " * 8192


BAD_REQUESTS = [
    # (id, method, path, request kwargs, status, expected param or None)
    ("malformed-json", "POST", C, {"content": b'{"prompt": "hi", '}, 400, None),
    ("body-not-object", "POST", C, {"json": ["hi"]}, 400, None),
    ("missing-prompt", "POST", C, {"json": {"model": MODEL}}, 400, "prompt"),
    ("prompt-wrong-type", "POST", C, {"json": {"prompt": 123}}, 400, "prompt"),
    ("empty-prompt", "POST", C, {"json": {"prompt": ""}}, 400, "prompt"),
    ("empty-prompt-list", "POST", C, {"json": {"prompt": []}}, 400, "prompt"),
    ("empty-token-list-in-batch", "POST", C, {"json": {"prompt": [[1, 2], []]}}, 400, "prompt"),
    ("mixed-token-list", "POST", C, {"json": {"prompt": [1, "a", 3]}}, 400, "prompt"),
    ("token-out-of-vocab", "POST", C, {"json": {"prompt": [1, 2, 10**6]}}, 400, "prompt"),
    ("negative-token-id", "POST", C, {"json": {"prompt": [1, -5]}}, 400, "prompt"),
    ("negative-max-tokens", "POST", C, {"json": {"prompt": "hi", "max_tokens": -1}}, 400, "max_tokens"),
    ("zero-max-tokens", "POST", C, {"json": {"prompt": "hi", "max_tokens": 0}}, 400, "max_tokens"),
    ("huge-max-tokens", "POST", C, {"json": {"prompt": "hi", "max_tokens": 10**9}}, 400, "max_tokens"),
    ("max-tokens-string", "POST", C, {"json": {"prompt": "hi", "max_tokens": "ten"}}, 400, "max_tokens"),
    ("n-zero", "POST", C, {"json": {"prompt": "hi", "n": 0}}, 400, "n"),
    ("n-too-large", "POST", C, {"json": {"prompt": "hi", "n": 1000}}, 400, "n"),
    ("negative-temperature", "POST", C, {"json": {"prompt": "hi", "temperature": -0.5}}, 400, "temperature"),
    ("temperature-string", "POST", C, {"json": {"prompt": "hi", "temperature": "hot"}}, 400, "temperature"),
    ("top-p-zero", "POST", C, {"json": {"prompt": "hi", "top_p": 0}}, 400, "top_p"),
    ("top-p-above-one", "POST", C, {"json": {"prompt": "hi", "top_p": 1.5}}, 400, "top_p"),
    ("top-k-below-minus-one", "POST", C, {"json": {"prompt": "hi", "top_k": -5}}, 400, "top_k"),
    ("logprobs-too-many", "POST", C, {"json": {"prompt": "hi", "logprobs": 50}}, 400, "logprobs"),
    ("presence-penalty-range", "POST", C, {"json": {"prompt": "hi", "presence_penalty": 5}}, 400,
     "presence_penalty"),
    ("empty-stop-string", "POST", C, {"json": {"prompt": "hi", "stop": [""]}}, 400, "stop"),
    ("stop-wrong-type", "POST", C, {"json": {"prompt": "hi", "stop": 5}}, 400, "stop"),
    ("min-tokens-over-max", "POST", C, {"json": {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}}, 400,
     "min_tokens"),
    ("stream-not-bool", "POST", C, {"json": {"prompt": "hi", "stream": "maybe"}}, 400, "stream"),
    ("stream-options-without-stream", "POST", C,
     {"json": {"prompt": "hi", "stream_options": {"include_usage": True}}}, 400, None),
    ("suffix-unsupported", "POST", C, {"json": {"prompt": "hi", "suffix": "x"}}, 400, None),
    ("unknown-model", "POST", C, {"json": {"model": "gpt-17", "prompt": "hi"}}, 404, "model"),
    ("prompt-over-context", "POST", C, {"json": {"prompt": LONG_PROMPT, "max_tokens": 1}}, 400, "prompt"),
    ("chat-missing-messages", "POST", CH, {"json": {"model": MODEL}}, 400, "messages"),
    ("chat-empty-messages", "POST", CH, {"json": {"messages": []}}, 400, "messages"),
    ("chat-bad-role", "POST", CH, {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, 400, None),
    ("chat-image-part", "POST", CH, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}}, 400, None),
    ("chat-unknown-model", "POST", CH, {"json": {"model": "nope", "messages": MSG}}, 404, "model"),
    ("chat-negative-max-completion-tokens", "POST", CH, {"json": {"messages": MSG, "max_completion_tokens": -3}},
     400, "max_completion_tokens"),
    ("chat-top-logprobs-without-logprobs", "POST", CH, {"json": {"messages": MSG, "top_logprobs": 2}}, 400, None),
    ("chat-tools-unsupported", "POST", CH, {"json": {"messages": MSG, "tools": [{"type": "function"}]}}, 400, None),
    ("chat-over-context", "POST", CH, {"json": {"messages": [{"role": "user", "content": LONG_PROMPT}]}}, 400,
     "messages"),
    # response_format: the field named exactly (a dotted param is compared whole)
    ("rf-unknown-type", "POST", CH, {"json": {"messages": MSG, "response_format": {"type": "xml"}}}, 400,
     "response_format.type"),
    ("rf-missing-type", "POST", C, {"json": {"prompt": "hi", "response_format": {}}}, 400, "response_format.type"),
    ("rf-not-object", "POST", CH, {"json": {"messages": MSG, "response_format": "json"}}, 400, "response_format"),
    ("rf-missing-json-schema", "POST", CH, {"json": {"messages": MSG, "response_format": {"type": "json_schema"}}},
     400, "response_format.json_schema"),
    ("rf-json-schema-with-json-object", "POST", CH, {"json": {"messages": MSG, "response_format": {
        "type": "json_object", "json_schema": {"name": "p", "schema": PERSON}}}}, 400, "response_format.json_schema"),
    ("rf-missing-schema", "POST", CH, {"json": {"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p"}}}}, 400, "response_format.json_schema.schema"),
    ("rf-missing-name", "POST", CH, {"json": {"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"schema": PERSON}}}}, 400, "response_format.json_schema.name"),
    ("rf-schema-not-object", "POST", C, {"json": {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": json.dumps(PERSON)}}}}, 400,
     "response_format.json_schema.schema"),
    ("rf-schema-not-json-schema", "POST", CH, {"json": {"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}}}}, 400,
     "response_format.json_schema.schema"),
    ("rf-schema-bad-pattern", "POST", C, {"json": {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "(["}}}}}, 400,
     "response_format.json_schema.schema"),
    # valid JSON Schema that the backend (xgrammar, no fallback) cannot compile: a 400 before anything is streamed
    ("rf-schema-uncompilable", "POST", CH, {"json": {"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/$defs/missing"}}}}}, 400,
     "response_format.json_schema.schema"),
    ("rf-schema-unsupported-streamed", "POST", CH, {"json": {"messages": MSG, "stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}}, 400,
     "response_format.json_schema.schema"),
    ("rf-schema-uncompilable-completions", "POST", C, {"json": {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "(?<=a)b"}}}}},
     400, "response_format.json_schema.schema"),
    ("missing-key", "POST", C, {"json": {"prompt": "hi"}, "headers": {"Authorization": ""}}, 401, None),
    ("wrong-key", "POST", C, {"json": {"prompt": "hi"}, "headers": {"Authorization": "Bearer nope"}}, 401, None),
    ("wrong-auth-scheme", "GET", "/v1/models", {"headers": {"Authorization": f"Basic {API_KEY}"}}, 401, None),
    ("oversized-body", "POST", C, {"json": {"prompt": "x" * (MAX_BODY + 10)}}, 413, None),
    ("oversized-chunked-body", "POST", C, {"content": _chunks(MAX_BODY + 10),
                                           "headers": {"Content-Type": "application/json"}}, 413, None),
    ("unknown-route", "GET", "/v1/nothing-here", {}, 404, None),
    ("wrong-method", "GET", C, {}, 405, None),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(http, tokenizer, case):
    name, method, path, kwargs, status, param = case
    kwargs = dict(kwargs)
    if "content" in kwargs and callable(getattr(kwargs["content"], "__next__", None)):
        kwargs["content"] = _chunks(MAX_BODY + 10)  # a fresh generator per run
    r = http.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:  # the field, possibly with a position inside it ("prompt.1"); a dotted one exactly
        got = err["param"] or ""
        assert got == param if "." in param else got.split(".")[0] == param, err
    if name.startswith("rf-"):  # the message names the field too
        assert param in err["message"], err
    if name == "prompt-over-context":
        n = len(tokenizer(LONG_PROMPT).input_ids)
        assert str(MAX_MODEL_LEN) in err["message"] and str(n) in err["message"], err
    if name == "huge-max-tokens":
        assert str(MAX_MODEL_LEN) in err["message"] and str(10**9) in err["message"], err
    if status == 401:
        assert r.headers.get("www-authenticate") == "Bearer"
    good_request(http)


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_health_version_metrics_need_no_key(server):
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    v = httpx.get(server.url + "/version", timeout=30).json()
    assert v["vllm"].startswith("0.32")


# ---- structured outputs (response_format) ---------------------------------------------------------------------------


def test_response_format_json_schema(client, http):
    """json_schema: schema-valid JSON, plain and streamed, chat and completions, n > 1 (the engine's grammar does it;
    the server was started with disable_any_whitespace, so the object ends well within max_tokens)."""
    import jsonschema

    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Name a character, and say whether they are alive."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=128, temperature=0,
                                       response_format=rf)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=128, temperature=0.8,
                                                 seed=1, response_format=rf, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", streamed
    jsonschema.validate(json.loads(streamed), PERSON)
    r = client.completions.create(model=MODEL, prompt="KING.\n", max_tokens=128, n=2, temperature=1.0, seed=3,
                                  extra_body={"response_format": rf})
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
    good_request(http)


def test_response_format_json_object(client, http):
    """json_object: the grammar admits any JSON object, so the output opens one and never strays from JSON; a
    random-weight model may not close it within max_tokens, so it parses only when it stopped by itself."""
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Reply in JSON."}],
                                       max_tokens=32, temperature=0, response_format={"type": "json_object"})
    choice = r.choices[0]
    assert choice.message.content.startswith("{"), choice.message.content
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    # "text" is the default, spelled out
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, response_format={"type": "text"}, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    # and the OpenAPI document describes the field
    doc = http.get("/openapi.json").json()
    for req in ("ChatCompletionRequest", "CompletionRequest"):
        assert "response_format" in doc["components"]["schemas"][req]["properties"]
    rf = doc["components"]["schemas"]["ResponseFormat"]
    assert rf["properties"]["type"]["enum"] == ["text", "json_object", "json_schema"]
    good_request(http)


# ---- engine-facing behaviour ----------------------------------------------------------------------------------------


def test_metrics_kv_layout(http, model_path):
    from transformers import AutoConfig

    from lckv_vllm import register
    from lckv_vllm.plan import plan_from_config

    register()  # AutoConfig must know "lckv-llama" even when this test runs alone

    plan = plan_from_config(AutoConfig.from_pretrained(str(model_path)))
    m = metrics(http)
    assert m["lckv_kv_layers"] == plan.num_layers == 6
    assert m["lckv_kv_producing_layers"] == len(plan.producers) == 3
    assert m["lckv_kv_bytes_per_token"] == plan.kv_bytes_per_token(2, 32, 4)  # 2 KV heads x 32 dims x fp32
    assert m["lckv_kv_full_bytes_per_token"] == 2 * m["lckv_kv_bytes_per_token"]
    assert m["lckv_kv_tokens_per_sequence_max"] == 0  # full pages: a sequence keeps all its tokens
    # 64 MiB of KV at 1536 bytes/token, in whole 16-token blocks
    cap = m["lckv_kv_capacity_tokens"]
    assert cap % 16 == 0 and 0.9 * (64 << 20) / 1536 <= cap <= (64 << 20) / 1536
    assert 0 <= m["lckv_kv_usage_ratio"] <= 1
    assert m["lckv_engine_healthy"] == 1
    assert any(k.startswith("lckv_request_ttft_seconds_count") for k in m)
    assert any(k.startswith('lckv_requests_total{endpoint="/v1/completions",status="200"}') for k in m)


def test_metrics_prefill_telemetry(http):
    """The engine's convergence telemetry reaches /metrics: passes per prefill (histogram, at most m+b), the last
    pass's change, the tolerance."""
    from lckv_vllm.settings import DEFAULT_PREFILL_TOL

    before = metrics(http).get("lckv_prefill_passes_count", 0)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog " * 4,
                                           "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    m = metrics(http)
    assert m["lckv_prefill_passes_count"] >= before + 1
    assert m['lckv_prefill_passes_bucket{le="9.0"}'] == m["lckv_prefill_passes_count"]  # never more than m+b
    assert m['lckv_prefill_passes_bucket{le="1.0"}'] == 0  # a multi-token prompt runs at least two passes
    assert m["lckv_prefill_tokens_total"] >= 36
    # at least two passes over every prompt token but the first (the economy skips the exact first row)
    recomputed, tokens = m["lckv_prefill_recomputed_tokens_total"], m["lckv_prefill_tokens_total"]
    assert recomputed >= 2 * tokens - m["lckv_prefill_passes_count"]
    assert m["lckv_prefill_tolerance"] == DEFAULT_PREFILL_TOL
    assert m["lckv_prefill_last_change"] >= 0 and "lckv_prefill_unconverged_total" in m


def test_usage_reports_prefix_cache_hits(http):
    """A cyclic plan serves prefix-cache hits by default; usage.prompt_tokens_details.cached_tokens (OpenAI's field)
    says how many prompt tokens came from the cache."""
    prompt = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3
    first = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0})
    second = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert first.status_code == second.status_code == 200
    u1, u2 = first.json()["usage"], second.json()["usage"]
    assert u1["prompt_tokens_details"]["cached_tokens"] == 0
    assert u2["prompt_tokens_details"]["cached_tokens"] >= 16  # at least one full 16-token block
    assert u2["prompt_tokens_details"]["cached_tokens"] < u2["prompt_tokens"]


def _wait_idle(http, timeout: float) -> tuple[float, dict]:
    t0 = time.monotonic()
    while True:
        m = metrics(http)
        if m["lckv_requests_running"] == 0 and m["lckv_requests_waiting"] == 0 and \
                m["lckv_requests_unfinished"] == 0 and m["lckv_sequences_admitted"] == 0:
            return time.monotonic() - t0, m
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the engine still has requests after {timeout} s: {m}")
        time.sleep(0.1)


def _stream_tokens(c: httpx.Client, body: dict, stop_after: int | None = None):
    """Stream a completion with logprobs=0 (so every event says how many tokens it carries): yields
    (arrival time, tokens in the event) per event; stops reading after `stop_after` tokens."""
    seen = 0
    with c.stream("POST", "/v1/completions", json={**body, "stream": True, "logprobs": 0}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            n = len(event["choices"][0]["logprobs"]["tokens"]) if event["choices"] else 0
            seen += n
            yield time.monotonic(), n
            if stop_after is not None and seen >= stop_after:
                return


def test_disconnect_mid_stream_aborts_engine_request(http, server):
    _wait_idle(http, 30)
    body = {"model": MODEL, "prompt": "Tell me a long story", "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        # the engine's decode pace, measured on a whole 64-token stream (events may carry several tokens when the
        # HTTP side lags the engine, so tokens are counted, not events)
        events = list(_stream_tokens(c, {**body, "max_tokens": 64}))
        assert sum(n for _, n in events) == 64
        per_token = (events[-1][0] - events[0][0]) / (64 - events[0][1])
        _wait_idle(http, 30)
        before = metrics(http).get('lckv_requests_total{endpoint="/v1/completions",status="499"}', 0)
        # disconnect as soon as the first tokens arrive: the engine then still has hundreds of steps to go
        got = list(_stream_tokens(c, {**body, "max_tokens": 480}, stop_after=1))
        during = metrics(http)
    received = sum(n for _, n in got)
    assert during["lckv_requests_running"] == 1 and during["lckv_kv_usage_ratio"] > 0, (received, during)
    remaining = (480 - received) * per_token  # the time the rest of the request would have taken
    took, after = _wait_idle(http, 30)
    assert took < max(0.5, remaining / 3), (took, remaining)
    assert after['lckv_requests_total{endpoint="/v1/completions",status="499"}'] == before + 1
    good_request(http)


def test_disconnect_while_waiting_for_plain_response_aborts(http, server):
    body = {"model": MODEL, "prompt": "Another long one", "max_tokens": 480, "ignore_eos": True}
    # give up long before 480 tokens can be ready (>= 1 ms each here): the client is gone while the request runs.
    # On a loaded machine this client can be descheduled for longer than the whole generation (it then gets the
    # full response): so it tries again, and it must give up at least once in three tries.
    for _ in range(3):
        try:
            httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                       timeout=httpx.Timeout(60, read=0.25))
        except httpx.ReadTimeout:
            break
    else:
        pytest.fail("the response arrived before a 0.25 s read timeout three times: the test cannot disconnect")
    _wait_idle(http, 10)
    good_request(http)


def test_32_concurrent_requests_all_succeed(server, tokenizer):
    from openai import AsyncOpenAI

    async def run():
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=180)

        async def one(i: int):
            extra = {"ignore_eos": True}
            if i % 4 == 0:
                r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"#{i}"}],
                                                         max_tokens=16, extra_body=extra, temperature=0.8, seed=i)
                return r.usage.completion_tokens, r.choices[0].message.content
            if i % 4 == 1:
                stream = await client.completions.create(model=MODEL, prompt=f"Request {i}:", max_tokens=16,
                                                         stream=True, stream_options={"include_usage": True},
                                                         extra_body=extra)
                chunks = [c async for c in stream]
                return chunks[-1].usage.completion_tokens, "".join(c.choices[0].text for c in chunks if c.choices)
            r = await client.completions.create(model=MODEL, prompt=f"Request number {i} says", max_tokens=16,
                                                temperature=0, extra_body=extra)
            assert r.usage.prompt_tokens == len(tokenizer(f"Request number {i} says").input_ids)
            return r.usage.completion_tokens, r.choices[0].text

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 32 and all(n == 16 for n, _ in results)


def test_queue_limit_answers_503(http, server):
    _wait_idle(http, 30)
    limit = MAX_NUM_SEQS + MAX_QUEUED  # 36 sequences
    body = {"model": MODEL, "prompt": "Fill the queue", "max_tokens": 480, "ignore_eos": True, "stream": True,
            "n": limit // 2}
    rejected_before = metrics(http)["lckv_requests_rejected_total"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c1, \
            httpx.Client(base_url=server.url, headers=headers, timeout=60) as c2:
        with c1.stream("POST", C, json=body) as r1, c2.stream("POST", C, json=body) as r2:
            assert r1.status_code == r2.status_code == 200
            r = http.post(C, json={"model": MODEL, "prompt": "one more", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.headers.get("retry-after") and r.json()["error"]["code"] == "queue_full"
            assert metrics(http)["lckv_requests_rejected_total"] == rejected_before + 1
    _wait_idle(http, 30)
    good_request(http)


def test_sigterm_finishes_running_request_and_exits_0(server, http):
    import psutil

    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "the engine core runs in a child process"
    result = {}

    def stream():
        body = {"model": MODEL, "prompt": "Finish me", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            with c.stream("POST", C, json=body) as r:
                result["events"] = [line for line in r.iter_lines() if line]

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    rc = server.stop(timeout=90)
    t.join(30)
    assert rc == 0, server.log_tail()
    events = result.get("events", [])
    assert events and events[-1] == "data: [DONE]", events[-3:]  # the in-flight request was allowed to finish
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"engine processes left behind: {alive}"


# ---- engine failure (in-process, stand-in engine) --------------------------------------------------------------------


def test_engine_failure_is_500_and_server_keeps_answering(tokenizer):
    from lckv_vllm.server.app import create_app
    from lckv_vllm.server.engine import EngineFrontend

    async def run():
        engine = StubEngine(tokenizer, max_model_len=MAX_MODEL_LEN)
        fe = EngineFrontend(engine, served_model_names=[MODEL], model_path="stub")
        app = create_app(fe)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            ok = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
            assert (await c.post(C, json=ok)).status_code == 200
            r = await c.post(C, json={**ok, "prompt": "please FAIL"})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "simulated kernel failure" in r.json()["error"]["message"]
            # streamed: the failure arrives as an error event, then [DONE]
            r = await c.post(C, json={**ok, "prompt": "please FAIL", "stream": True})
            events = [e for e in r.text.split("\n\n") if e]
            assert json.loads(events[0][6:])["error"]["code"] == "engine_error" and events[-1] == "data: [DONE]"
            r = await c.post(CH, json={"messages": [{"role": "user", "content": "FAIL"}], "max_tokens": 1})
            assert r.status_code == 500
            assert (await c.post(C, json=ok)).status_code == 200  # still answering
            assert fe.admitted == 0
            r = await c.post(C, json={**ok, "prompt": "DIE"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
            assert (await c.get("/health")).status_code == 503
            m = parse_metrics((await c.get("/metrics")).text)
            assert m["lckv_engine_healthy"] == 0 and m['lckv_requests_total{endpoint="/v1/completions",status="500"}'] == 2
        fe.shutdown()

    asyncio.run(run())


# ---- `vllm serve` with the plugin ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    cmd = [str(BIN / "vllm"), "serve", str(model_path), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", MODEL, "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-memory-bytes", str(64 << 20), "--max-num-seqs", "8"]
    srv = start_server(cmd, log, server_env(), port)
    yield srv
    srv.stop()
    srv.kill_group()


def test_vllm_serve_completion(vllm_server, tokenizer):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(tokenizer(prompt).input_ids) and r.usage.completion_tokens == 12
    assert r.choices[0].text
    if prompt in GREEDY:  # same checkpoint, same engine: both front ends must return the same greedy text
        assert r.choices[0].text == GREEDY[prompt]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=1)


# ---- a deploy-time pattern over HTTP ---------------------------------------------------------------------------------


def test_lckv_serve_with_layer_types_override(model_dir, tmp_path):
    """lckv-serve on an identity checkpoint with --hf-overrides CLA-2: the active plan and its KV bytes per token
    in /v1/models and /metrics, half the bytes of the checkpoint's own plan, and it serves."""
    port = free_port()
    override = "0_0_2_2_4_4"
    cmd = [str(BIN / "lckv-serve"), str(model_dir("tiny-identity")), "--port", str(port), "--served-model-name", "cla",
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes",
           str(16 << 20), "--block-size", "16", "--hf-overrides", json.dumps({"layer_types": override})]
    srv = start_server(cmd, tmp_path / "server.log", server_env(), port)
    try:
        card = httpx.get(srv.url + "/v1/models/cla", timeout=30).json()
        assert card["layer_types"] == override and card["checkpoint_layer_types"] == "0_1_2_3_4_5"
        assert card["kv_bytes_per_token"] == 3 * 2 * 2 * 32 * 4  # 3 producers x K,V x 2 KV heads x 32 x fp32
        m = parse_metrics(httpx.get(srv.url + "/metrics", timeout=30).text)
        assert m["lckv_kv_producing_layers"] == 3 and m["lckv_kv_bytes_per_token"] == card["kv_bytes_per_token"]
        assert m[f'lckv_kv_plan_info{{checkpoint_layer_types="0_1_2_3_4_5",layer_types="{override}"}}'] == 1
        r = httpx.post(srv.url + "/v1/completions", timeout=120, json={"model": "cla", "prompt": "Hello",
                                                                      "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert "(override), not the checkpoint's 0_1_2_3_4_5" in (tmp_path / "server.log").read_text()
    finally:
        srv.stop()
        srv.kill_group()
