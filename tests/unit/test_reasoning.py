"""/api/dce/proxy mirrors `reasoning` <-> `reasoning_content` so clients that
know either name see the thoughts; /v1/chat/completions leaves bytes alone."""

import pytest

from unit_helpers import ALICE_KEY, DCE_EXTENSION_BODY, bearer, sse_json, without_usage_event
from wire import read_extension_body

AUTH = bearer(ALICE_KEY)
BOTH = ("reasoning", "reasoning_content")


@pytest.fixture(params=BOTH)
def thinking_fake(request, fake_vllm):
    """The fake emits reasoning under one of the two names (vLLM 0.32 / older)."""
    fake_vllm.reasoning = True
    fake_vllm.reasoning_field = request.param
    fake_vllm.n_chunks = 3
    return fake_vllm


def test_stream_reasoning_is_mirrored_on_dce_proxy(client, thinking_fake):
    r = client.post("/api/dce/proxy", json={**DCE_EXTENSION_BODY, "n": 2}, headers=AUTH)
    assert r.status_code == 200
    events = sse_json(r.get_data())
    thoughts = {0: "", 1: ""}
    for event in events:
        for choice in event["choices"]:
            delta = choice["delta"]
            if any(name in delta for name in BOTH):
                assert delta["reasoning"] == delta["reasoning_content"], delta
                thoughts[choice["index"]] += delta["reasoning"]
    assert thoughts == {i: thinking_fake.expected_reasoning(i) for i in (0, 1)}


def test_extension_still_reads_the_answer_when_reasoning_is_mirrored(client, thinking_fake):
    r = client.post("/api/dce/proxy", json=DCE_EXTENSION_BODY, headers=AUTH)
    shown = read_extension_body(r.get_data())
    assert shown.shown == (thinking_fake.expected_text(0), "stop")
    assert shown.reasoning == thinking_fake.expected_reasoning(0)


def test_non_stream_reasoning_is_mirrored_on_dce_proxy(client, thinking_fake):
    r = client.post("/api/dce/proxy", json={**DCE_EXTENSION_BODY, "stream": False, "n": 2}, headers=AUTH)
    assert r.status_code == 200
    for choice in r.get_json()["choices"]:
        message = choice["message"]
        expected = thinking_fake.expected_reasoning(choice["index"])
        assert message["reasoning"] == message["reasoning_content"] == expected
        assert message["content"] == thinking_fake.expected_text(choice["index"])


def test_chat_completions_stream_bytes_are_not_touched(client, thinking_fake):
    r = client.post("/v1/chat/completions", json={**DCE_EXTENSION_BODY, "model": "tiny"}, headers=AUTH)
    assert r.status_code == 200
    assert r.get_data() == without_usage_event(bytes(thinking_fake.generation_requests[-1].response_body))
    other = "reasoning_content" if thinking_fake.reasoning_field == "reasoning" else "reasoning"
    assert f'"{other}"'.encode() not in r.get_data()
