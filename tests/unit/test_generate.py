"""/api/dce/generate: n answers for one prompt, in index order, stream or not,
and its input validation (422 with the offending `param`)."""

import json

import pytest

from unit_helpers import ALICE_KEY, assert_error, bearer, sse_json

AUTH = bearer(ALICE_KEY)


def generate(client, **body):
    return client.post("/api/dce/generate", json=body, headers=AUTH)


def test_non_stream_returns_n_responses_in_index_order(client, fake_vllm):
    r = generate(client, prompt="Write a haiku", n=4, max_tokens=2)
    assert r.status_code == 200, r.data
    body = r.get_json()
    assert body["responses"] == [fake_vllm.expected_text(i, 2) for i in range(4)]
    assert body["finish_reasons"] == ["length"] * 4
    assert body["usage"]["completion_tokens"] == 8
    assert body["model"] == "tiny"
    sent = fake_vllm.last_body
    assert fake_vllm.generation_requests[-1].path == "/v1/completions"
    assert sent["prompt"] == "Write a haiku" and sent["n"] == 4 and sent["max_tokens"] == 2


def test_responses_are_ordered_by_choice_index_not_by_position(client, fake_vllm):
    fake_vllm.reverse_choices = True  # upstream lists choices 3,2,1,0
    body = generate(client, prompt="p", n=4).get_json()
    assert body["responses"] == [fake_vllm.expected_text(i) for i in range(4)]


def test_default_n(make_app, fake_vllm):
    body = generate(make_app(DCE_DEFAULT_N="3").test_client(), prompt="p").get_json()
    assert len(body["responses"]) == 3 and fake_vllm.last_body["n"] == 3
    assert len(generate(make_app().test_client(), prompt="p").get_json()["responses"]) == 10


def test_chat_mode_sends_the_prompt_as_one_user_message(client, fake_vllm):
    r = generate(client, prompt="Hello there", n=2, chat=True)
    assert r.status_code == 200, r.data
    assert r.get_json()["responses"] == [fake_vllm.expected_text(i) for i in range(2)]
    assert fake_vllm.generation_requests[-1].path == "/v1/chat/completions"
    assert fake_vllm.last_body["messages"] == [{"role": "user", "content": "Hello there"}]


def test_sampling_fields_are_forwarded(client, fake_vllm):
    fields = {"temperature": 0.7, "top_p": 0.5, "seed": 42, "stop": ["END", "\n\n"]}
    assert generate(client, prompt="p", n=1, **fields).status_code == 200
    assert {k: fake_vllm.last_body[k] for k in fields} == fields


@pytest.mark.parametrize("chat", [False, True])
def test_stream_events_are_tagged_by_index(client, fake_vllm, chat):
    fake_vllm.n_chunks = 4
    r = generate(client, prompt="p", n=3, stream=True, chat=chat)
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream"
    texts, finishes = {}, {}
    for event in sse_json(r.get_data()):
        assert event["type"] in ("delta", "finish"), event
        if event["type"] == "delta":
            texts[event["index"]] = texts.get(event["index"], "") + event["text"]
        else:
            assert event["index"] not in finishes, "two finish events for one index"
            finishes[event["index"]] = event["finish_reason"]
    assert texts == {i: fake_vllm.expected_text(i) for i in range(3)}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", -1), ("n", 17), ("n", "3"), ("n", 2.5), ("n", True),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", "10"), ("max_tokens", 1.5),
    ("temperature", 3), ("temperature", -0.1), ("temperature", "hot"),
    ("top_p", 0), ("top_p", 1.5),
    ("seed", "seven"), ("seed", 1.5),
    ("prompt", ""), ("prompt", 5), ("prompt", ["a", "b"]), ("prompt", None),
    ("stop", 5), ("stop", [1, 2]), ("stop", {"a": "b"}),
    ("stream", "yes"), ("chat", 1), ("model", 5),
])
def test_invalid_field_is_422_naming_it(client, fake_vllm, field, value):
    body = {"prompt": "p", "n": 2, field: value}
    assert_error(client.post("/api/dce/generate", json=body, headers=AUTH), 422,
                 type_="invalid_request_error", param=field)
    assert fake_vllm.generation_requests == [], "an invalid request reached vLLM"


@pytest.mark.parametrize("field", ["n", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "chat",
                                   "model"])
def test_optional_field_null_is_default_or_422_never_5xx(client, field):
    # The contract does not say whether null means "absent"; either reading is fine.
    r = generate(client, prompt="p", **{field: None})
    if r.status_code != 200:
        assert_error(r, 422, param=field)


def test_missing_prompt_is_422(client):
    assert_error(generate(client, n=2), 422, param="prompt")


def test_n_cap_follows_config(make_app):
    c = make_app(DCE_MAX_N="3", DCE_DEFAULT_N="2").test_client()
    assert_error(generate(c, prompt="p", n=4), 422, param="n")
    assert generate(c, prompt="p", n=3).status_code == 200


@pytest.mark.parametrize("body", [b"{", b'{"prompt": "p",}', b"not json", b"\xff\xfe{}"])
def test_malformed_json_is_400(client, body):
    r = client.post("/api/dce/generate", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400, type_="invalid_request_error")


@pytest.mark.parametrize("body", [[], [1, 2], "text", 3, None])
def test_json_that_is_not_an_object_is_400(client, body):
    r = client.post("/api/dce/generate", data=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400, type_="invalid_request_error")
