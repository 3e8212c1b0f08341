"""The server at the HTTP level, as clients and proxies meet it: the status of
an unknown model and of a body past the limit, HEAD on the read-only routes,
and a path with a trailing slash. The real server in a subprocess; each bad
request is followed by a good one, and no KV block may stay in use."""
from __future__ import annotations

import httpx
import openai
import pytest

from server_helpers import API_KEY, ServerProcess, metric, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMIT = 65536


@pytest.fixture(scope="module")
def server(server_model_dir, tmp_path_factory):
    srv = ServerProcess(server_model_dir, tmp_path_factory.mktemp("server") / "server.log", "--num-kv-blocks", "128",
                        "--max-body-bytes", str(LIMIT))
    yield srv
    assert srv.stop() == 0


def _serves_and_holds_nothing(server) -> None:
    good = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH,
                      timeout=30)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
    assert metric(wait_idle(server.url), "orca_serve_kv_blocks_used") == 0


def test_an_unknown_model_is_not_found_to_the_openai_client(server, server_model_dir):
    """It was a 400, which the client raises as BadRequestError: a malformed
    request, not a wrong name. The message names both models."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == (f'the model "gpt-4" does not exist; this server serves "{server_model_dir.name}" '
                                "(see GET /v1/models)")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    # The model route says it in the same words.
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert caught.value.body == error
    _serves_and_holds_nothing(server)


def test_an_empty_model_name_is_the_served_model(server):
    """As with no model field, and as vLLM answers it: a client that fills
    the field from an unset setting sends "". It was a 404."""
    for route, body in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(server.url + route, json={**body, "model": "", "max_tokens": 2}, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    _serves_and_holds_nothing(server)


def test_a_chunked_body_past_the_limit_is_413(server):
    """A body without Content-Length is counted as it arrives and refused at
    the limit, unread past it: its size is not known, only that it exceeds."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(2 * LIMIT // 1024):
            yield b"x" * 1024

    r = httpx.post(server.url + "/v1/completions", content=chunks(),
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert "content-length" not in r.request.headers  # chunked, as the test means
    assert r.status_code == 413, r.text
    assert r.json()["error"] == {"message": f"request body exceeds the limit of {LIMIT} bytes (--max-body-bytes)",
                                 "type": "invalid_request_error", "param": "body", "code": "body_too_large"}
    _serves_and_holds_nothing(server)


@pytest.mark.parametrize("path,headers", [("/health", {}), ("/metrics", {}), ("/v1/models", AUTH),
                                          ("/v1/models/{model}", AUTH)])
def test_head_is_get_without_the_body(server, server_model_dir, path, headers):
    """Load balancers' health checks and ``curl -I`` send HEAD: it was a 405."""
    url = server.url + path.format(model=server_model_dir.name)
    head, get = httpx.head(url, headers=headers, timeout=10), httpx.get(url, headers=headers, timeout=10)
    assert head.status_code == get.status_code == 200, head.text
    assert head.content == b"" and get.content
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_needs_the_api_key_as_get_does(server):
    assert httpx.head(server.url + "/v1/models", timeout=10).status_code == 401


def test_a_trailing_slash_serves_the_route_instead_of_redirecting(server, server_model_dir):
    """Starlette answered ``POST /v1/completions/`` with a 307 to the path
    without the slash, which many clients follow without the body."""
    r = httpx.post(server.url + "/v1/completions/", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    r = httpx.post(server.url + "/v1/chat/completions/", headers=AUTH, timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    r = httpx.get(server.url + "/v1/models/", headers=AUTH, timeout=10)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [server_model_dir.name]
    r = httpx.get(f"{server.url}/v1/models/{server_model_dir.name}/", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["id"] == server_model_dir.name, r.text
    assert httpx.get(server.url + "/health/", timeout=10).status_code == 200
    # The slash is not a wildcard: an unknown path with one is still a 404.
    r = httpx.post(server.url + "/v1/engines/", json={}, headers=AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    _serves_and_holds_nothing(server)


def test_a_model_name_ending_in_a_slash_keeps_it():
    """The slash middleware took the slash off ``/v1/models/org/model/``, so a
    served name ``org/model/`` was no longer found; the list route still takes one."""
    from fastapi import APIRouter, FastAPI
    from fastapi.testclient import TestClient

    from orca_serve.entrypoints.openai.middleware import install_handlers

    app, v1 = FastAPI(redirect_slashes=False), APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models():
        return {"listed": True}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        return {"name": name}

    app.include_router(v1)
    install_handlers(app)
    client = TestClient(app)
    assert client.get("/v1/models/org/model/").json() == {"name": "org/model/"}
    assert client.get("/v1/models/org/model").json() == {"name": "org/model"}
    assert client.get("/v1/models/").json() == {"listed": True}
