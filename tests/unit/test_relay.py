"""The two stream relays on their own (relay.py): whole events however vLLM's bytes are cut, [DONE]
and vLLM's error event told from text that quotes them, and vLLM's usage taken and passed on only
as the client asked (issue 13)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from dce_proxy import relay, response_events, sse

from dce_proxy.record import RequestRecord
from dce_proxy.relay import Passthrough, Rewriter
from dce_proxy.sse import data_event
from dce_proxy.usage import UsageAsked

NOT_ASKED, ASKED = UsageAsked(final=False, every_event=False), UsageAsked(final=True, every_event=False)


def _chunk(text: str, finish: str | None = None, **extra) -> dict:
    return {"id": "c", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}], **extra}


USAGE = {"id": "c", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
TOKENS = [data_event(_chunk("")), data_event(_chunk("a")), data_event(_chunk("b")),
          data_event(_chunk("c", "stop"))]
STREAM = b"".join(TOKENS) + data_event(USAGE) + b"data: [DONE]\n\n"


def _error_event(error) -> bytes:
    return data_event(error.body())


def _passthrough(asked: UsageAsked = NOT_ASKED) -> tuple[Passthrough, RequestRecord]:
    record = RequestRecord("test", stream=True)
    return Passthrough(_error_event, record, asked), record


def _relay_in_pieces(relay, data: bytes, cuts: list[int]) -> bytes:
    edges = [0, *cuts, len(data)]
    return b"".join(relay.feed(data[start:end]) for start, end in zip(edges, edges[1:])) + relay.end()


@pytest.mark.parametrize("asked", [NOT_ASKED, ASKED])
@pytest.mark.parametrize("separator", [b"\n\n", b"\r\n\r\n"])
def test_passthrough_sends_whole_events_byte_for_byte_however_the_reads_fall(asked, separator):
    stream = STREAM.replace(b"\n\n", separator)
    expected = stream if asked.final else stream.replace(data_event(USAGE).replace(b"\n\n", separator), b"")
    for cuts in [[], list(range(1, len(stream))), *([cut] for cut in range(1, len(stream)))]:
        relay, record = _passthrough(asked)
        assert _relay_in_pieces(relay, stream, cuts) == expected, cuts
        assert relay.complete and not relay.failed
        assert (record.prompt_tokens, record.completion_tokens, record.tokens_exact, record.text_events) == (7, 3, True, 3)


def test_passthrough_decodes_only_vllms_usage_event_of_a_read_that_holds_many(monkeypatch):
    decoded = []
    decode = relay.event_json
    monkeypatch.setattr(relay, "event_json", lambda data: decoded.append(data) or decode(data))
    passthrough, record = _passthrough()
    assert passthrough.feed(STREAM) == STREAM.replace(data_event(USAGE), b"")
    assert decoded == [data_event(USAGE)[len(b"data: "):-2]]
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)


def test_quoted_done_and_error_in_the_text_are_only_text():
    quoted = data_event(_chunk('data: [DONE]\n\n')) + data_event(_chunk('{"error": {"x": 1}}'))
    relay, record = _passthrough()
    assert relay.feed(quoted) == quoted
    assert not relay.complete and not relay.failed


def test_vllms_error_event_marks_the_stream_failed_though_done_follows():
    error = b'data: {"error": {"message": "EngineCore encountered an issue.", "code": 500}}\n\n'
    relay, _ = _passthrough()
    assert relay.feed(TOKENS[0] + TOKENS[1] + error + b"data: [DONE]\n\n")
    assert relay.complete and relay.failed


def test_a_cut_last_event_is_not_sent_half_only_the_error_that_says_why():
    relay, record = _passthrough()
    sent = relay.feed(TOKENS[0] + TOKENS[1][:20])
    end = relay.end()
    assert sent == TOKENS[0]
    assert json.loads(end.split(b"\n\n")[0][len(b"data: "):])["error"]["message"].startswith("vLLM ended the stream")
    assert record.completion_tokens == 0 and not record.tokens_exact


def test_rewriter_takes_vllms_usage_out_of_every_event_for_a_client_that_did_not_ask():
    # The DCE routes ask vLLM for usage in every event: a stream cut early still has the prompt count.
    record = RequestRecord("test", stream=True)
    with_usage = [data_event(_chunk(text, usage={"prompt_tokens": 7, "completion_tokens": i, "total_tokens": 7 + i}))
                  for i, text in enumerate(["", "a", "b"])]
    relay = Rewriter(lambda payload: data_event(payload), _error_event, record, NOT_ASKED)
    out = relay.feed(b"".join(with_usage))
    assert b"usage" not in out and out.count(b"data: ") == 3
    # The client left here: vLLM's prompt count, and the two tokens it was sent.
    assert (record.prompt_tokens, record.completion_tokens, record.tokens_exact) == (7, 2, False)


_PIECES = [b"data: ", b"data:", b"data: {", b"[DONE]", b"\n", b"\r", b"\n\n", b'"error"', b":", b" ", b"{", b"event: ",
           b"event:", b"error", b"response.", b"response.completed", b"response.incomplete", b"response.failed", b"x"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_a_line_match_finds_exactly_what_its_pattern_finds(pieces):
    # Each LineMatch skips bytes without one of its words: none of its patterns can match without one.
    data = b"".join(pieces)
    for match in (sse._DONE_EVENT, relay._VLLM_ERROR_EVENT, response_events._LAST_EVENT, response_events._FAILURE_EVENT):
        assert match.found_in(data) == (match._regex.search(data) is not None), (match._regex.pattern, data)
