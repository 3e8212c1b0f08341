"""The OpenAI-compatible server, black-box: the real server in a subprocess on
a tiny random llama, driven by the official ``openai`` client (sync and
async) and raw httpx."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import openai
import pytest

from server_helpers import API_KEY, ServerProcess, build_tiny_model, get_metrics, metric, wait_idle

IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(model_dir, log, "--num-kv-blocks", "512", "--block-size", "16",
                        "--max-body-bytes", "65536", "--log-level", "info")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_models_health_metrics(server, client, model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_dir.name]
    assert httpx.get(f"{server.url}/health").status_code == 200
    text = get_metrics(server.url)
    for name in ("orca_serve_time_to_first_token_seconds_bucket", "orca_serve_kv_blocks_total",
                 "orca_serve_num_requests_waiting", "orca_serve_iteration_batch_size_bucket"):
        assert name in text
    assert metric(text, "orca_serve_kv_blocks_total") == 512


def test_completion_usage_and_length(client, tokenizer):
    r = client.completions.create(model=client.models.list().data[0].id, prompt="Hello world", max_tokens=8,
                                  temperature=0, extra_body=IGNORE_EOS)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(tokenizer("Hello world").input_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_stream_equals_non_stream(client):
    kw = dict(model=_model(client), prompt="How are you", max_tokens=24, temperature=1.0, seed=7,
              extra_body=IGNORE_EOS)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def _model(client) -> str:
    return client.models.list().data[0].id


def test_chat_async_stream_equals_non_stream(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        model = (await aclient.models.list()).data[0].id
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello world"}]
        kw = dict(model=model, messages=msgs, max_completion_tokens=16, temperature=0.9, seed=3,
                  extra_body=IGNORE_EOS)
        full, stream = await asyncio.gather(aclient.chat.completions.create(**kw),
                                            aclient.chat.completions.create(stream=True, **kw))
        parts, roles, finishes = [], [], []
        async for chunk in stream:
            for ch in chunk.choices:
                roles += [ch.delta.role] if ch.delta.role else []
                parts += [ch.delta.content or ""]
                finishes += [ch.finish_reason] if ch.finish_reason else []
        await aclient.close()
        return full, "".join(parts), roles, finishes

    full, streamed, roles, finishes = asyncio.run(run())
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert streamed == full.choices[0].message.content
    assert roles == ["assistant"] and finishes == ["length"]
    assert full.usage.completion_tokens == 16


def test_chat_sync_max_tokens_alias(client):
    r = client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_n_choices_seeded_and_reproducible(client):
    kw = dict(model=_model(client), prompt="the people", max_tokens=6, n=3, seed=11, temperature=1.0,
              extra_body=IGNORE_EOS)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 18
    assert a.usage.prompt_tokens == client.completions.create(**{**kw, "n": 1}).usage.prompt_tokens


def test_prompt_shapes(client):
    r = client.completions.create(model=_model(client), prompt=["Hello", "water"], max_tokens=3,
                                  extra_body=IGNORE_EOS)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 6
    r = client.completions.create(model=_model(client), prompt=[5, 6, 7], max_tokens=2, extra_body=IGNORE_EOS)
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 2


def test_stop_string_streaming_and_not(client):
    kw = dict(model=_model(client), prompt="Hello", max_tokens=40, temperature=1.0, seed=21, extra_body=IGNORE_EOS)
    text = client.completions.create(**kw).choices[0].text
    # A character that first occurs past the start, with clean text before it.
    k = next(i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isalnum()
             and text.find(ch) == i and "\ufffd" not in text[:i])
    stopped = client.completions.create(stop=[text[k]], **kw).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:k]
    chunks = list(client.completions.create(stop=text[k], stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == text[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.completions.create(model=_model(client), prompt="Hello", max_tokens=4, logprobs=2,
                                  extra_body=IGNORE_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(v <= 0 for v in lp.token_logprobs) and all(2 <= len(t) <= 3 for t in lp.top_logprobs)
    kw = dict(model=_model(client), messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True,
              top_logprobs=2, extra_body=IGNORE_EOS)
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kw) for ch in chunk.choices
                if ch.logprobs for e in ch.logprobs.content]
    assert len(streamed) == 4


def test_logit_bias(client, tokenizer):
    """logit_bias was refused whatever it held ("logit_bias is not supported"),
    even all zeros, which change nothing. Zeros are a no-op; +100 makes a token
    win every greedy step, in completions and chat."""
    kw = dict(model=_model(client), max_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    plain = client.completions.create(prompt="Hello", **kw).choices[0].text
    assert client.completions.create(prompt="Hello", logit_bias={"5": 0, "17": 0}, **kw).choices[0].text == plain
    token = tokenizer("the").input_ids[0]
    r = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], logit_bias={str(token): 100},
                                       **kw)
    assert r.choices[0].message.content == tokenizer.decode([token] * 5)


def test_prefix_cache_hit_reported_as_cached_tokens(client):
    prompt = "the people of the water world call the first number " * 4  # several full 16-token blocks
    kw = dict(model=_model(client), prompt=prompt, max_tokens=2, extra_body=IGNORE_EOS)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert first.usage.prompt_tokens > 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


def test_scheduling_fields_accepted(client):
    r = client.completions.create(model=_model(client), prompt="Hello", max_tokens=2, user="u-1",
                                  extra_body={"priority": -3, "ttft_slo_ms": 500, "tpot_slo_ms": 100,
                                              "top_k": 5, "top_p": 0.9, "min_tokens": 2})
    assert r.usage.completion_tokens == 2


def test_temperature_defaults_to_one():
    from orca_serve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    assert CompletionRequest(prompt="x").temperature == 1.0
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).temperature == 1.0


_CHAT = "/v1/chat/completions"
_CMPL = "/v1/completions"
_MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (id, path, body (bytes or JSON), headers, status, param)
    ("malformed-json", _CMPL, b'{"prompt": "hi", ', None, 400, None),
    ("not-an-object", _CMPL, [1, 2], None, 400, None),
    ("max-tokens-type", _CMPL, {"prompt": "hi", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("temperature-type", _CMPL, {"prompt": "hi", "temperature": "hot"}, None, 400, "temperature"),
    ("temperature-range", _CMPL, {"prompt": "hi", "temperature": 5}, None, 400, "temperature"),
    ("ignore-eos-type", _CMPL, {"prompt": "hi", "ignore_eos": "yes"}, None, 400, "ignore_eos"),
    ("n-zero", _CMPL, {"prompt": "hi", "n": 0}, None, 400, "n"),
    ("min-over-max-tokens", _CMPL, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, None, 400, "min_tokens"),
    ("content-type", _CHAT, {"messages": [{"role": "user", "content": 5}]}, None, 400, "messages[0].content"),
    ("no-messages", _CHAT, {"messages": []}, None, 400, "messages"),
    ("top-logprobs-alone", _CHAT, {"messages": _MSG, "top_logprobs": 2}, None, 400, "top_logprobs"),
    # 404 as OpenAI and vLLM answer (their clients raise NotFoundError); it was a 400.
    ("unknown-model", _CMPL, {"model": "gpt-4", "prompt": "hi"}, None, 404, "model"),
    ("unknown-model-chat", _CHAT, {"model": "gpt-4", "messages": _MSG}, None, 404, "model"),
    ("prompt-over-context", _CMPL, {"prompt": "the " * 400}, None, 400, "prompt"),
    ("messages-over-context", _CHAT, {"messages": [{"role": "user", "content": "the " * 400}]}, None, 400,
     "messages"),
    ("max-tokens-cannot-fit", _CMPL, {"prompt": "hi", "max_tokens": 1000}, None, 400, "max_tokens"),
    ("max-completion-tokens-cannot-fit", _CHAT, {"messages": _MSG, "max_completion_tokens": 1000}, None, 400,
     "max_completion_tokens"),
    ("token-id-out-of-vocab", _CMPL, {"prompt": [1, 99999]}, None, 400, "prompt"),
    # The engine checks one prompt at a time; the error names the one of the batch.
    ("token-id-out-of-vocab-in-batch", _CMPL, {"prompt": [[1, 2], [1, 99999]]}, None, 400, "prompt[1]"),
    ("token-id-out-of-vocab-in-mixed-batch", _CMPL, {"prompt": ["hi", "hi", [-1]]}, None, 400, "prompt[2]"),
    ("prompt-empty-list", _CMPL, {"prompt": []}, None, 400, "prompt"),
    ("prompt-empty-string", _CMPL, {"prompt": ""}, None, 400, "prompt"),
    ("body-too-large", _CMPL, {"prompt": "x" * 100_000}, None, 413, "body"),  # was a 400
    ("no-api-key", _CMPL, {"prompt": "hi"}, {"Authorization": ""}, 401, None),
    ("wrong-api-key", _CMPL, {"prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, None),
    ("unknown-route", "/v1/engines", {"prompt": "hi"}, None, 404, None),
    # Valid JSON, but a lone surrogate escape no tokenizer (or reply) can encode.
    ("lone-surrogate-prompt", _CMPL, b'{"prompt": "hi \\ud800", "max_tokens": 2}', None, 400, "prompt"),
    ("lone-surrogate-in-batch", _CMPL, b'{"prompt": ["hi", "\\uDC00"]}', None, 400, "prompt[1]"),
    ("lone-surrogate-model", _CMPL, b'{"prompt": "hi", "model": "\\ud800"}', None, 400, "model"),
    ("lone-surrogate-chat", _CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", '
     b'"text": "\\ud800"}]}]}', None, 400, "messages[0].content[0].text"),
    ("nested-too-deep", _CMPL, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, 400, None),
    ("fan-out-over-queue", _CMPL, {"prompt": ["hi"] * 100, "n": 16, "max_tokens": 2}, None, 400, "n"),
    ("image-part", _CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, None, 400, "messages[0].content"),
    ("text-part-without-text", _CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, None,
     400, "messages[0].content"),
    ("tool-choice-without-tools", _CHAT, {"messages": _MSG, "tool_choice": "required"}, None, 400, "tool_choice"),
    # The deprecated forms of tools/tool_choice were ignored: a plain reply, no error.
    ("legacy-functions", _CHAT, {"messages": _MSG, "functions": [{"name": "f", "parameters": {}}]}, None, 400,
     "functions"),
    ("legacy-function-call", _CHAT, {"messages": _MSG, "function_call": "auto"}, None, 400, "function_call"),
    ("prompt-empty-in-batch", _CMPL, {"prompt": ["hi", ""]}, None, 400, "prompt[1]"),
    ("logit-bias-over-100", _CMPL, {"prompt": "hi", "logit_bias": {"5": 101}}, None, 400, "logit_bias"),
    ("logit-bias-key-not-a-token-id", _CHAT, {"messages": _MSG, "logit_bias": {"the": 5}}, None, 400, "logit_bias"),
    ("logit-bias-over-300-tokens", _CMPL, {"prompt": "hi", "logit_bias": {str(t): 1 for t in range(301)}}, None,
     400, "logit_bias"),
    ("logit-bias-outside-the-vocabulary", _CMPL, {"prompt": "hi", "logit_bias": {"99999": -5}}, None, 400,
     "logit_bias"),
    # The checks LLM.chat shares with the server.
    ("messages-not-a-list", _CHAT, {"messages": "hi"}, None, 400, "messages"),
    ("message-not-an-object", _CHAT, {"messages": ["hi"]}, None, 400, "messages[0]"),
    ("message-a-number", _CHAT, {"messages": [_MSG[0], 5]}, None, 400, "messages[1]"),
    ("role-unknown", _CHAT, {"messages": [{"role": "bot", "content": "hi"}]}, None, 400, "messages[0].role"),
    # Values shown as JSON has them (null, true), not as Python does (None, True).
    ("role-null", _CHAT, {"messages": [{"role": None, "content": "hi"}]}, None, 400, "messages[0].role"),
    ("content-true", _CHAT, {"messages": [{"role": "user", "content": True}]}, None, 400, "messages[0].content"),
    ("role-missing", _CHAT, {"messages": [{"content": "hi"}]}, None, 400, "messages[0].role"),
    ("name-type", _CHAT, {"messages": [{"role": "user", "content": "hi", "name": 5}]}, None, 400, "messages[0].name"),
    # Integers past Python's 4300-digit limit for reading one: the answer said the
    # body was "not valid JSON: Exceeds the limit (4300 digits) ..." and named no field.
    ("huge-int-max-tokens", _CMPL, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", None, 400, "max_tokens"),
    ("huge-int-token-id", _CMPL, b'{"prompt": [1, ' + b"9" * 5000 + b"]}", None, 400, "prompt[1]"),
    ("huge-int-priority", _CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "priority": -' + b"9" * 5000
     + b"}", None, 400, "priority"),
    ("huge-int-top-level", _CMPL, b"9" * 5000, None, 400, None),
    # Readable, but its 4300 digits filled the message.
    ("max-tokens-of-4300-digits", _CMPL, b'{"prompt": "hi", "max_tokens": ' + b"9" * 4300 + b"}", None, 400,
     "max_tokens"),
]


# What the message must say where the field alone does not tell what is wrong.
BAD_MESSAGES = {"unknown-model": 'the model "gpt-4" does not exist; this server serves "',
                "unknown-model-chat": "(see GET /v1/models)",
                "body-too-large": "request body is 100014 bytes; the limit is 65536 bytes",
                # In the client's words and with the value it sent: it said "{role, content} dict, got int".
                "message-a-number": "messages[1]: must be an object with role and content, got 5",
                "message-not-an-object": 'messages[0]: must be an object with role and content, got "hi"',
                "messages-not-a-list": 'messages: must be a list of objects with role and content, got "hi"',
                "content-type": "messages[0].content must be a string, a list of text parts or null, got 5",
                "logit-bias-over-100": "logit_bias[5] must be in [-100, 100], got 101.0",
                "logit-bias-key-not-a-token-id": 'logit_bias: keys must be token ids ("50256"), got "the"',
                "logit-bias-over-300-tokens": "logit_bias may bias at most 300 tokens (OpenAI's limit), got 301",
                "logit-bias-outside-the-vocabulary": "logit_bias: token id 99999 is outside the vocabulary",
                "image-part": 'part 0 has type "image_url"; only text parts are supported',
                "text-part-without-text": 'part 0 needs "text", a string',
                "role-unknown": 'messages[0].role must be one of system, developer, user, assistant, tool; got "bot"',
                "role-null": "messages[0].role must be a string, got null",
                "content-true": "messages[0].content must be a string, a list of text parts or null, got true",
                "lone-surrogate-prompt": "unpaired UTF-16 surrogate",
                "nested-too-deep": "nested too deeply", "fan-out-over-queue": "1600 sequences",
                "token-id-out-of-vocab-in-batch": "prompt[1]: token id 99999 is outside the vocabulary",
                "token-id-out-of-vocab-in-mixed-batch": "prompt[2]: token id -1 is outside the vocabulary",
                "legacy-functions": "function calling is not supported",
                "huge-int-max-tokens": "max_tokens: got an integer of 5000 digits; integers in a request may have "
                                       "at most 4300",
                "huge-int-token-id": "prompt[1]: got an integer of 5000 digits",
                "huge-int-priority": "priority: got an integer of 5000 digits",
                "huge-int-top-level": "body: got an integer of 5000 digits",
                "max-tokens-of-4300-digits": "max_tokens (an integer of 4300 digits) + prompt"}


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_then_good_request(server, case):
    case_id, path, body, headers, status, param = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content,
                   headers={**_auth(), "Content-Type": "application/json", **(headers or {})}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and len(err["message"]) < 1000
    assert err["param"] == param
    assert BAD_MESSAGES.get(case_id, "") in err["message"]
    # The field is named once ("prompt: token id ..."), not once per layer it passed.
    assert not re.match(r"^([\w.\[\]]+): \1\b", err["message"]), err["message"]
    good = httpx.post(server.url + _CMPL, json={"prompt": "hi", "max_tokens": 2}, headers=_auth(), timeout=30)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_null_for_a_nullable_openai_field_means_its_default(server):
    """OpenAI declares temperature, top_p, n, stream, echo and chat's logprobs
    nullable (vLLM a null top_k too), and clients that serialise every field
    send null for those they leave unset: each was refused ("temperature: Input
    should be a valid number"). Null now means the default."""
    nulls = {"temperature": None, "top_p": None, "top_k": None, "n": None, "stream": None}
    r = httpx.post(server.url + _CMPL, headers=_auth(), timeout=30,
                   json={"prompt": "hi", "max_tokens": 2, "echo": None, "logprobs": None, **nulls})
    assert r.status_code == 200, r.text
    assert [c["logprobs"] for c in r.json()["choices"]] == [None]  # n null: one choice, not streamed
    r = httpx.post(server.url + _CHAT, headers=_auth(), timeout=30,
                   json={"messages": _MSG, "max_tokens": 2, "logprobs": None, **nulls})
    assert r.status_code == 200, r.text
    assert [c["logprobs"] for c in r.json()["choices"]] == [None]


def test_huge_readable_integers_are_served(server):
    """A seed, top_k and priority of 4300 digits (the most JSON is read with)
    are valid: the request is served, and nothing is left behind."""
    big = "9" * 4300
    body = (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": true, "seed": '
            + big.encode() + b', "top_k": ' + big.encode() + b', "priority": -' + big.encode() + b', "n": 2}')
    r = httpx.post(server.url + _CHAT, content=body, headers={**_auth(), "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    assert metric(wait_idle(server.url), "orca_serve_kv_blocks_used") == 0


def _aborts(url: str) -> float:
    return metric(get_metrics(url), "orca_serve_requests_finished_total", 'finish_reason="abort"')


def test_streaming_disconnect_aborts(server):
    before = _aborts(server.url)
    body = {"prompt": "Hello", "max_tokens": 240, "stream": True, **IGNORE_EOS}
    with httpx.stream("POST", server.url + _CMPL, json=body, headers=_auth(), timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    text = wait_idle(server.url)
    assert _aborts(server.url) == before + 1
    assert metric(text, "orca_serve_kv_blocks_used") == 0


def test_non_streaming_disconnect_aborts(server):
    before = _aborts(server.url)
    generated = metric(get_metrics(server.url), "orca_serve_generation_tokens_total")
    # The tiny model decodes in ~1 ms per token: 240 tokens take ~0.25 s, so a
    # client that gives up after 0.03 s leaves long before the end.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + _CMPL, json={"prompt": "Hello", "max_tokens": 240, **IGNORE_EOS},
                   headers=_auth(), timeout=0.03)
    text = wait_idle(server.url)
    assert _aborts(server.url) == before + 1
    assert metric(text, "orca_serve_generation_tokens_total") - generated < 240
    assert metric(text, "orca_serve_kv_blocks_used") == 0


def test_client_gone_before_its_body_arrived_is_no_server_error(server):
    """A client that closes the connection mid-upload leaves no traceback in
    the server's log (it was logged twice, as an unhandled error and by
    uvicorn). Nothing else is logged for it: its 499 reaches no one."""
    head = (f"POST {_CMPL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: 100\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + b'{"prompt": "h')
    time.sleep(1.0)  # the server sees the close at once; before the fix the traceback came within ms
    good = httpx.post(server.url + _CMPL, json={"prompt": "hi", "max_tokens": 2}, headers=_auth(), timeout=30)
    assert good.status_code == 200
    log = server.output()
    assert "Traceback" not in log and "unhandled error" not in log


def test_metrics_count_the_event_loop_s_cpu(server, client):
    """The thread serving HTTP has a CPU counter of its own: the work a
    client's requests cost the server beside the model's."""
    before = get_metrics(server.url)
    stream = client.completions.create(model=_model(client), prompt="Hello", max_tokens=16, stream=True,
                                       extra_body=IGNORE_EOS)
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"
    after = get_metrics(server.url)
    loop = [metric(text, "orca_serve_event_loop_cpu_seconds_total") for text in (before, after)]
    assert 0 < loop[0] < loop[1]
    # The server process's, model included, is beside it (counted in clock ticks).
    assert metric(after, "process_cpu_seconds_total") >= metric(before, "process_cpu_seconds_total") > 0


def test_the_event_loop_s_cpu_counts_from_when_it_began_serving():
    """The loop runs on the CLI's main thread, which imported torch and
    transformers first: seconds of CPU that are not serving, counted before."""
    from orca_serve.entrypoints.openai.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    t = time.thread_time()
    while time.thread_time() - t < 0.2:  # start-up work on this thread
        pass
    metrics.serving_started()
    assert 0 <= metric(metrics.render().decode(), "orca_serve_event_loop_cpu_seconds_total") < 0.1


def test_request_log_lines_and_metrics(server, client):
    client.completions.create(model=_model(client), prompt="Hello", max_tokens=3, extra_body=IGNORE_EOS)
    text = wait_idle(server.url)
    assert metric(text, "orca_serve_e2e_request_latency_seconds_count") > 0
    assert metric(text, "orca_serve_iterations_total") > 0
    assert metric(text, "orca_serve_generation_tokens_total") > 0
    assert metric(text, "orca_serve_prompt_tokens_total") > 0
    log = server.output()
    line = next(ln for ln in log.splitlines() if "request finished" in ln and "completion_tokens=3 " in ln)
    for key in ("id=cmpl-", "prompt_tokens=", "ttft_s=", "latency_s=", "finish_reason=length"):
        assert key in line
