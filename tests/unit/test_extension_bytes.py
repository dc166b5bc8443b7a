"""The extension route's byte path (issue 15): most of vLLM's chunks are rewritten on their bytes,
without decoding them. Whatever a chunk holds, the bytes sent must decode to exactly what the
decoding path (chunks.for_extension) sends, and a stream must leave the same record."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dce_proxy.chunks import for_extension, for_extension_bytes
from dce_proxy.record import RequestRecord
from dce_proxy.relay import Rewriter
from dce_proxy.sse import data_event, event_data
from dce_proxy.usage import UsageAsked

# A stream of vLLM 0.32 (CPU image, tiny model, --reasoning-parser deepseek_r1) with
# continuous_usage_stats, byte for byte as it sent it.
USAGE_AT = '"usage":{"prompt_tokens":14,"total_tokens":%d,"completion_tokens":%d,' \
           '"completion_tokens_details":{"reasoning_tokens":0}}'
HEAD = '{"id":"chatcmpl-86e9e9adaca8c573","object":"chat.completion.chunk","created":1796049255,"model":"tiny",'
VLLM_STREAM = [
    HEAD + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    + USAGE_AT % (14, 0) + ',"prompt_token_ids":null,"prompt_text":null}',
    *(HEAD + '"choices":[{"index":0,"delta":{"reasoning":%s},"logprobs":null,"finish_reason":null,"token_ids":null}],'
      % json.dumps(text) + USAGE_AT % (14 + i, i) + "}" for i, text in enumerate([" _", ' "Return\\', "tent"], 1)),
    HEAD + '"choices":[{"index":0,"delta":{"content":" path"},"logprobs":null,"finish_reason":null,"token_ids":null}],'
    + USAGE_AT % (18, 4) + "}",
    HEAD + '"choices":[{"index":0,"delta":{"content":"utf"},"logprobs":null,"finish_reason":"length",'
    '"stop_reason":null,"token_ids":null}],' + USAGE_AT % (19, 5) + "}",
    HEAD + '"choices":[],' + USAGE_AT % (19, 5) + ',"system_fingerprint":"vllm-0.32.0-68ccc72a"}',
]
NOT_ASKED = UsageAsked(final=False, every_event=False)


def test_every_open_chunk_of_a_real_stream_takes_the_byte_path():
    taken = [for_extension_bytes(chunk.encode()) is not None for chunk in VLLM_STREAM]
    assert taken == [True, True, True, True, True, False, False]  # not the finishing chunk, nor the usage one


def test_a_reasoning_delta_is_mirrored_on_its_bytes():
    sent = for_extension_bytes(VLLM_STREAM[2].encode())
    assert sent.count(b'"reasoning_content":' + json.dumps(' "Return\\').encode()) == 1
    assert json.loads(sent) == next(for_extension(json.loads(VLLM_STREAM[2])))


ASKED_EVERY_WAY = (NOT_ASKED, UsageAsked(final=True, every_event=False), UsageAsked(final=True, every_event=True))


def _relayed(stream: list[str], with_bytes: bool, asked: UsageAsked) -> tuple[list[dict], RequestRecord]:
    record = RequestRecord("test", stream=True)
    relay = Rewriter(lambda payload: b"".join(data_event(chunk) for chunk in for_extension(payload)),
                     lambda error: b"", record, asked, for_extension_bytes if with_bytes else None)
    out = relay.feed(b"".join(f"data: {chunk}\n\n".encode() for chunk in stream) + b"data: [DONE]\n\n")
    events = [event_data(event) for event in out.split(b"\n\n") if event]
    return [json.loads(data) for data in events if data != b"[DONE]"], record


def test_a_stream_sends_and_records_the_same_whichever_path_its_chunks_take():
    for asked in ASKED_EVERY_WAY:
        fast, fast_record = _relayed(VLLM_STREAM, True, asked)
        slow, slow_record = _relayed(VLLM_STREAM, False, asked)
        assert fast == slow
        assert (fast_record.prompt_tokens, fast_record.completion_tokens, fast_record.text_events) == \
               (slow_record.prompt_tokens, slow_record.completion_tokens, slow_record.text_events) == (14, 5, 5)
        assert any("usage" in event for event in fast if event["choices"]) == asked.every_event


def test_a_stream_cut_early_still_has_vllms_prompt_count_from_the_byte_path():
    _, record = _relayed(VLLM_STREAM[:2], True, NOT_ASKED)
    assert (record.prompt_tokens, record.completion_tokens, record.tokens_exact) == (14, 1, False)


# Shapes vLLM does not write, each once taken for its own by an earlier version of the byte path.
UNUSUAL = [
    b'{"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"x":{"finish_reason":null}}',
    b'{"id":"c","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null},{"delta":{"content":"b"}}]}',
    b'{"id":"c","choices":[{"index":"0","delta":{"reasoning":"a"},"finish_reason":null}]}',
    b'{"id":"c","choices":[{"index":0,"delta":{"reasoning" :"a"},"finish_reason":null}]}',
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":'
    b'{"content":"error"},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens": 7}}',
]


def test_a_chunk_vllm_would_not_write_is_decoded_or_sent_the_same():
    for data in UNUSUAL:
        sent = for_extension_bytes(data)
        assert sent is None or json.loads(sent) == next(for_extension(json.loads(data))), data
        for asked in ASKED_EVERY_WAY:
            fast, fast_record = _relayed([data.decode()], True, asked)
            slow, slow_record = _relayed([data.decode()], False, asked)
            assert fast == slow and fast_record.prompt_tokens == slow_record.prompt_tokens, data


def test_a_last_event_cut_short_is_never_sent_half():
    record = RequestRecord("test", stream=True)
    relay = Rewriter(lambda payload: b"".join(data_event(chunk) for chunk in for_extension(payload)),
                     lambda error: b"data: {\"error\":{}}\n\n", record, NOT_ASKED, for_extension_bytes)
    cut = VLLM_STREAM[4].encode()[:-1]  # all but its closing brace
    out = relay.feed(f"data: {VLLM_STREAM[1]}\n\n".encode() + b"data: " + cut) + relay.end()
    events = [event_data(event) for event in out.split(b"\n\n") if event]
    assert cut not in out
    assert all(data == b"[DONE]" or isinstance(json.loads(data), dict) for data in events)


# -- any chunk at all ----------------------------------------------------------------------------
# Text that looks like the keys the byte path looks for, and the characters JSON escapes.
TEXT = st.one_of(st.text(min_size=1, max_size=12), st.sampled_from([
    '"finish_reason":null', '"index":1', '"reasoning":"x"', '"error":{}', '"usage":{"prompt_tokens":1}',
    'error', 'usage', '\\', '"', '}', '{"id":', 'ü\n\t', '']))
DELTA_KEYS = st.sampled_from(["role", "content", "reasoning", "reasoning_content", "tool_calls"])
FINISH = st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", "missing"]))


@st.composite
def chunks(draw) -> dict:
    """Chunks as vLLM writes them (its keys, in its order), each changed in up to two ways it may or
    may not write: most look like the ones the byte path takes, and many differ in one detail."""
    delta = draw(st.sampled_from([{"role": "assistant", "content": ""}, {"content": draw(TEXT)},
                                  {"reasoning": draw(TEXT)}]))
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    if draw(st.booleans()):
        choice["token_ids"] = None
    chunk = {"id": "chatcmpl-" + draw(TEXT), "object": "chat.completion.chunk", "created": 1,
             "model": draw(TEXT), "choices": [choice]}
    if draw(st.booleans()):
        chunk["usage"] = {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1,
                          "completion_tokens_details": draw(st.one_of(st.none(), st.just({"reasoning_tokens": 0})))}
    if draw(st.booleans()):
        chunk["prompt_token_ids"] = None
    for change in draw(st.lists(st.sampled_from(CHANGES), max_size=2)):
        change(draw, chunk)
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of them without choices (usage chunks)
        chunk["choices"] = []
    return chunk


def _another_delta_key(draw, chunk):
    key = draw(DELTA_KEYS)
    chunk["choices"][0]["delta"][key] = ([{"index": 0, "function": {"arguments": draw(TEXT)}}]
                                         if key == "tool_calls" else draw(st.one_of(st.none(), TEXT)))


def _finish(draw, chunk):
    finish = draw(FINISH)
    if finish == "missing":
        chunk["choices"][0].pop("finish_reason", None)
    else:
        chunk["choices"][0]["finish_reason"] = finish


def _second_choice(draw, chunk):
    chunk["choices"].append({"index": 1, "delta": {"content": draw(TEXT)}, "logprobs": None,
                             "finish_reason": draw(st.sampled_from([None, "stop"]))})


CHANGES = [
    _another_delta_key, _finish, _finish, _finish, _second_choice,
    lambda draw, chunk: chunk.update(error={"message": draw(TEXT)}),
    lambda draw, chunk: chunk["choices"][0].update(logprobs={"content": [{"token": draw(TEXT), "logprob": -1.0}]}),
    lambda draw, chunk: chunk["choices"][0].update(index=draw(st.sampled_from([1, "0", None]))),
    lambda draw, chunk: chunk.update(usage={"prompt_tokens": draw(st.sampled_from([None, "7", 7]))}),
]


@settings(max_examples=600, deadline=None)
@given(chunks())
@example({"id": "c", "choices": [{"index": 0, "delta": {"reasoning": 'a"b\\'}, "finish_reason": None}]})
@example({"id": "c", "choices": [{"index": 0, "delta": {"content": '"finish_reason":null'}}]})
def test_the_byte_path_sends_exactly_what_decoding_sends_or_leaves_the_chunk_to_it(chunk):
    # Written as vLLM writes JSON (compact, UTF-8 as it is).
    data = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False)
    sent = for_extension_bytes(data.encode())
    if sent is not None:
        decoded = list(for_extension(json.loads(data)))
        assert len(decoded) == 1 and json.loads(sent) == decoded[0]
    for asked in ASKED_EVERY_WAY:  # and so, vLLM's usage taken out as asked, the whole relay
        fast, fast_record = _relayed([data], True, asked)
        slow, slow_record = _relayed([data], False, asked)
        assert fast == slow
        assert (fast_record.prompt_tokens, fast_record.text_events) == \
               (slow_record.prompt_tokens, slow_record.text_events)
