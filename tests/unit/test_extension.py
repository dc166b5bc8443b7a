"""/api/dce/proxy as the DCE extension v1.2.0 reads it (tests/wire.py, as strict as the extension):
no token lost in a chunk that also ends the tab, and every failure shown as text in the tab."""

import json

import pytest

from dce_proxy.chunks import for_extension
from unit_helpers import ALICE_KEY, DCE_EXTENSION_BODY, bearer
from wire import read_extension_body, sse_events

AUTH = bearer(ALICE_KEY)
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}


def chunk(*choices, **extra):
    return {**HEAD, "choices": list(choices), **extra}


def choice(index, delta, finish=None, **extra):
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}


# -- splitting, chunk by chunk -------------------------------------------------------------------
def test_content_and_finish_in_one_chunk_become_two():
    out = list(for_extension(chunk(choice(0, {"content": "end."}, "length", stop_reason=None))))
    assert out == [chunk(choice(0, {"content": "end."}, None, stop_reason=None)),
                   chunk({"index": 0, "delta": {}, "finish_reason": "length", "stop_reason": None})]


def test_a_chunk_without_text_passes_with_an_explicit_null():
    role = {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert list(for_extension(role)) == [chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None})]
    empty_end = chunk(choice(0, {"content": ""}, "stop"))
    assert list(for_extension(empty_end)) == [empty_end]


def test_usage_chunk_passes_unchanged():
    usage = chunk(usage={"prompt_tokens": 7, "completion_tokens": 3})
    assert list(for_extension(json.loads(json.dumps(usage)))) == [usage]


def test_several_choices_are_each_split():
    out = list(for_extension(chunk(choice(0, {"content": "a"}, "stop"), choice(1, {"content": "b"}),
                                   choice(2, {}, "length"), usage={"completion_tokens": 9})))
    assert out[0] == chunk(choice(0, {"content": "a"}), choice(1, {"content": "b"}))
    assert out[1] == chunk({"index": 0, "delta": {}, "finish_reason": "stop"},
                           {"index": 2, "delta": {}, "finish_reason": "length"}, usage={"completion_tokens": 9})


def test_tool_call_delta_is_split_from_its_finish():
    call = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    out = list(for_extension(chunk(choice(0, {"tool_calls": call}, "tool_calls"))))
    assert out == [chunk(choice(0, {"tool_calls": call})),
                   chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls"})]


@pytest.mark.parametrize("name", ["reasoning", "reasoning_content"])
def test_reasoning_in_the_last_chunk_is_mirrored_and_split(name):
    out = list(for_extension(chunk(choice(0, {name: "so."}, "length"))))
    assert out[0]["choices"][0]["delta"] == {"reasoning": "so.", "reasoning_content": "so."}
    assert out[0]["choices"][0]["finish_reason"] is None
    assert out[1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]


# -- through the proxy, read like the extension ------------------------------------------------------
@pytest.mark.parametrize("n_chunks, max_tokens, finish", [(1, 16384, "stop"), (6, 16384, "stop"), (9, 4, "length")])
def test_the_extension_shows_every_token_of_the_answer(client, fake_vllm, n_chunks, max_tokens, finish):
    fake_vllm.n_chunks = n_chunks
    r = client.post("/api/dce/proxy", json={**DCE_EXTENSION_BODY, "max_tokens": max_tokens}, headers=AUTH)
    result = read_extension_body(r.get_data())
    assert result.shown == (fake_vllm.expected_text(0, min(n_chunks, max_tokens)), finish)
    assert result.saw_done and result.failure is None


def test_only_the_final_chunk_has_a_finish_reason_and_it_carries_nothing(client, fake_vllm):
    fake_vllm.n_chunks, fake_vllm.reasoning = 4, True
    r = client.post("/api/dce/proxy", json={**DCE_EXTENSION_BODY, "n": 2, "stream_options": {"include_usage": True}},
                    headers=AUTH)
    events = [json.loads(d) for d in sse_events(r.get_data())[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
    for index in (0, 1):
        mine = [c for e in events[:-1] for c in e["choices"] if c["index"] == index]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert mine[-1]["finish_reason"] == "stop" and mine[-1]["delta"] == {}
        assert "".join(c["delta"].get("content") or "" for c in mine) == fake_vllm.expected_text(index)


@pytest.mark.parametrize("fault", ["truncate", "garbage", "stall", "error"])
def test_a_stream_that_fails_shows_the_error_in_the_tab(make_app, fake_vllm, fault):
    c = make_app(DCE_FIRST_BYTE_TIMEOUT="0.5").test_client()
    c.get("/readyz")
    fake_vllm.n_chunks, fake_vllm.fault, fake_vllm.fault_after, fake_vllm.stall_seconds = 5, fault, 2, 2
    result = read_extension_body(c.post("/api/dce/proxy", json=DCE_EXTENSION_BODY, headers=AUTH).get_data())
    text, _, error = result.content.partition("\n\n[DCE proxy error: ")
    assert text == fake_vllm.expected_text(0, 2)
    assert error.endswith("]") and len(error) > 10
    assert result.finish_reason == "error" and result.saw_done
