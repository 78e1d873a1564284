"""With ``--api-key``, every route but ``/health`` answers 401 without the right bearer key."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest
from server_process import default_model_dir, engine_server

from radixfleet.engine.server.common import ServerState
from radixfleet.engine.server.http_server import build_app

KEY = "s3cret-key"
# One request per route of the app (checked against build_app's routes below).
ROUTES = [("GET", "/health_generate"), ("GET", "/get_model_info"), ("GET", "/get_server_info"),
          ("GET", "/metrics"), ("POST", "/generate"), ("POST", "/flush_cache"), ("GET", "/flush_cache"),
          ("POST", "/abort_request"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/score"),
          ("POST", "/encode"), ("POST", "/v1/embeddings"), ("POST", "/update_weights_from_disk"),
          ("POST", "/get_weights_by_name"), ("POST", "/load_lora_adapter"), ("POST", "/open_session"), ("POST", "/close_session"), ("POST", "/unload_lora_adapter"), ("GET", "/get_weights_by_name"),
          ("GET", "/tokenizer_files"), ("GET", "/kv_events/snapshot"), ("GET", "/no/such/route")]


def app_routes() -> set[tuple[str, str]]:
    fake_engine = SimpleNamespace(tokenizer_manager=SimpleNamespace(model_name="m", listeners=[]))
    app = build_app(ServerState(fake_engine))
    return {(m, r.path.replace(":path", "")) for r in app.routes for m in getattr(r, "methods", ())
            if m != "HEAD"}


def test_the_route_list_covers_the_app():
    assert app_routes() - {("GET", "/health")} == set(ROUTES) - {("GET", "/no/such/route")}


@pytest.fixture(scope="module")
def url():
    with engine_server(default_model_dir(), "--api-key", KEY, headers={"Authorization": f"Bearer {KEY}"}) as u:
        yield u


@pytest.mark.parametrize("method, path", ROUTES)
def test_401_without_or_with_a_wrong_key(url, method, path):
    path = path.replace("{model_id}", "x")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = httpx.request(method, url + path, headers=headers, json={"text": "hi"}, timeout=30)
        assert resp.status_code == 401, (path, headers, resp.text)
        assert "API key" in resp.json()["error"]["message"]


def test_health_is_open_and_the_key_opens_the_rest(url):
    assert httpx.get(url + "/health").status_code == 200
    ok = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/get_model_info", headers=ok).status_code == 200
    out = httpx.post(url + "/generate", headers=ok, timeout=60,
                     json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 2


def test_openai_client_with_and_without_the_key(url):
    good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert good.models.list().data
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
