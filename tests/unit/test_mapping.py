"""What the proxy changes in a request before vLLM sees it: the model name,
max_tokens / max_completion_tokens above the context, and the n cap."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from unit_helpers import ALICE_KEY, assert_error, bearer
from wire import wait_until

AUTH = bearer(ALICE_KEY)
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, **fields}, headers=AUTH)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/dce/proxy", "/v1/completions", "/api/dce/generate"])
@pytest.mark.parametrize("model", ["local-model", "unsloth/gpt-oss-20b", "", "tiny"])
def test_any_model_name_maps_to_the_served_model(client, fake_vllm, route, model):
    body = {"prompt": "hi"} if route.endswith(("/completions", "/generate")) and "chat" not in route \
        else {"messages": MESSAGES}
    r = client.post(route, json={**body, "model": model}, headers=AUTH)
    assert r.status_code == 200, r.data
    assert fake_vllm.last_body["model"] == "tiny"


def test_missing_model_maps_to_the_served_model(client, fake_vllm):
    assert chat(client).status_code == 200
    assert fake_vllm.last_body.get("model") == "tiny"


def test_alias_map_is_honoured_and_default_is_the_first_served_model(make_app, fake_vllm):
    fake_vllm.model_ids = ("tiny", "tiny-2")
    c = make_app(DCE_MODEL_ALIASES="big=tiny-2,gpt-4o=tiny-2").test_client()
    for requested, served in [("big", "tiny-2"), ("gpt-4o", "tiny-2"), ("local-model", "tiny"), ("", "tiny")]:
        r = c.post("/v1/chat/completions", json={"model": requested, "messages": MESSAGES}, headers=AUTH)
        assert r.status_code == 200, r.data
        assert fake_vllm.last_body["model"] == served, requested


@pytest.mark.parametrize("max_model_len", [4096, 2048])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_above_context_is_lowered_to_max_model_len(make_app, fake_vllm, max_model_len, field):
    fake_vllm.max_model_len = max_model_len  # read from /v1/models, not hard-coded
    r = chat(make_app().test_client(), **{field: 16384})
    assert r.status_code == 200, r.data
    assert fake_vllm.last_body[field] == max_model_len


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/api/dce/proxy", {"messages": MESSAGES}),
])
def test_max_tokens_lowered_on_other_routes(client, fake_vllm, route, body):
    assert client.post(route, json={**body, "max_tokens": 16384}, headers=AUTH).status_code == 200
    assert fake_vllm.last_body["max_tokens"] == 4096


@pytest.mark.parametrize("value", [1, 100, 4096])
def test_token_limit_within_context_is_kept(client, fake_vllm, value):
    assert chat(client, max_tokens=value).status_code == 200
    assert fake_vllm.last_body["max_tokens"] == value


def test_generate_default_max_tokens(make_app, fake_vllm):
    assert make_app().test_client().post("/api/dce/generate", json={"prompt": "hi"}, headers=AUTH).status_code == 200
    assert fake_vllm.last_body["max_tokens"] == 4096
    c = make_app(DCE_DEFAULT_MAX_TOKENS="123").test_client()
    assert c.post("/api/dce/generate", json={"prompt": "hi"}, headers=AUTH).status_code == 200
    assert fake_vllm.last_body["max_tokens"] == 123


def test_generate_default_max_tokens_above_context_is_lowered(make_app, fake_vllm):
    fake_vllm.max_model_len = 1024
    c = make_app(DCE_DEFAULT_MAX_TOKENS="4096").test_client()
    assert c.post("/api/dce/generate", json={"prompt": "hi"}, headers=AUTH).status_code == 200
    assert fake_vllm.last_body["max_tokens"] == 1024


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/dce/proxy"])
def test_n_above_cap_is_422_on_pass_through_routes(make_app, fake_vllm, route):
    c = make_app(DCE_MAX_N="4", DCE_DEFAULT_N="2").test_client()
    r = c.post(route, json={"messages": MESSAGES, "n": 5}, headers=AUTH)
    assert_error(r, 422, type_="invalid_request_error", param="n")
    assert fake_vllm.generation_requests == []
    assert c.post(route, json={"messages": MESSAGES, "n": 4}, headers=AUTH).status_code == 200
    assert fake_vllm.last_body["n"] == 4


def test_other_fields_reach_upstream_unchanged(client, fake_vllm):
    extra = {"temperature": 0.3, "top_p": 0.9, "seed": 7, "stop": ["\n"], "reasoning_effort": "medium",
             "stream_options": {"include_usage": True}, "stream": True}
    assert chat(client, **extra).status_code == 200
    sent = fake_vllm.last_body
    assert {k: sent.get(k) for k in extra} == extra


def test_a_slow_model_list_refresh_falls_back_on_the_known_list(make_app, fake_vllm, monkeypatch):
    # Under the load test's 200 streams, the CPU engine once took over 3 s to list its models and
    # the refresh, not the generation, failed a stream with 504.
    from dce_proxy import upstream
    monkeypatch.setattr(upstream, "_MODELS_QUICK_TIMEOUT_SECONDS", 0.3)
    c = make_app().test_client()
    assert chat(c).status_code == 200  # learns the model list
    monkeypatch.setattr(upstream, "_MODELS_TTL_SECONDS", 0)
    fake_vllm.models_delay = 1
    r = chat(c)
    assert r.status_code == 200, r.data
    assert fake_vllm.last_body["model"] == "tiny"
    assert_error(c.get("/readyz"), 503)  # the probe still says the engine is slow


def test_a_slow_first_model_list_is_waited_for(make_app, fake_vllm, monkeypatch):
    from dce_proxy import upstream
    monkeypatch.setattr(upstream, "_MODELS_QUICK_TIMEOUT_SECONDS", 0.3)
    fake_vllm.models_delay = 1  # nothing known to fall back on: wait as for any answer
    r = chat(make_app().test_client())
    assert r.status_code == 200, r.data


def test_a_readiness_flood_neither_holds_up_generations_nor_multiplies_model_reads(make_app, fake_vllm,
                                                                                    monkeypatch):
    # /readyz is public: probes that each read the model list under the lock every generation takes
    # would let anyone stall the generations (issue 12).
    from dce_proxy import upstream
    monkeypatch.setattr(upstream, "_MODELS_QUICK_TIMEOUT_SECONDS", 30)
    app = make_app()
    assert chat(app.test_client()).status_code == 200  # the model list is known
    # A busy engine lists its models slowly: far slower than a generation takes, whatever the load.
    fake_vllm.models_delay = 8
    listed_before = sum(r.path == "/v1/models" for r in fake_vllm.requests)
    with ThreadPoolExecutor(8) as pool:
        probes = [pool.submit(app.test_client().get, "/readyz") for _ in range(8)]
        wait_until(lambda: sum(r.path == "/v1/models" for r in fake_vllm.requests) > listed_before, 5,
                   "a probe to ask vLLM for its models")
        r = chat(app.test_client())
        assert r.status_code == 200, r.data
        assert not any(probe.done() for probe in probes), "the generation waited for the probes"
        assert all(probe.result().status_code == 200 for probe in probes)
    assert sum(r.path == "/v1/models" for r in fake_vllm.requests) == listed_before + 1  # one read, shared


@pytest.mark.parametrize("prompt, n, allowed", [
    (["p"] * 4, 1, True), (["p"] * 5, 1, False), (["p", "q"], 2, True), (["p", "q"], 3, False),
    ([1, 2, 3, 4, 5, 6, 7], 4, True),  # token ids: one prompt
    ([[1, 2], [3, 4], [5, 6]], 2, False),
])
def test_prompts_times_n_count_against_the_sequence_cap(make_app, fake_vllm, prompt, n, allowed):
    # One request with a list of prompts took one slot however many sequences it started (issue 12).
    c = make_app(DCE_MAX_N="4", DCE_DEFAULT_N="2").test_client()
    r = c.post("/v1/completions", json={"prompt": prompt, "n": n, "max_tokens": 4}, headers=AUTH)
    if allowed:
        assert r.status_code == 200, r.data
    else:
        assert_error(r, 422, param="prompt")
        assert not fake_vllm.generation_requests


@pytest.mark.parametrize("route, field, value", [
    ("/v1/completions", "logprobs", 6), ("/v1/chat/completions", "top_logprobs", 21),
    ("/v1/completions", "prompt_logprobs", 1), ("/v1/chat/completions", "prompt_logprobs", 0),
    ("/v1/completions", "echo", True),  # with logprobs 1 below: vLLM would compute the prompt's
])
def test_log_probabilities_are_bounded(client, fake_vllm, route, field, value):
    body = {"prompt": "p", "logprobs": 1} if route == "/v1/completions" else {"messages": MESSAGES}
    assert_error(client.post(route, json={**body, field: value}, headers=AUTH), 422, param=field)
    assert not fake_vllm.generation_requests


@pytest.mark.parametrize("route, fields", [
    ("/v1/completions", {"logprobs": 5}), ("/v1/completions", {"echo": True}),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 20}),
])
def test_log_probabilities_within_bounds_pass(client, fake_vllm, route, fields):
    body = {"prompt": "p"} if route == "/v1/completions" else {"messages": MESSAGES}
    assert client.post(route, json={**body, **fields}, headers=AUTH).status_code == 200
    assert {name: fake_vllm.last_body[name] for name in fields} == fields
