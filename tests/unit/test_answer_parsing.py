"""vLLM's answer parsed (answer.py's AnswerParser, httptools): the same body however chunks and reads
fall, the end told, what follows the end flagged, and broken HTTP refused or told."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dce_proxy.answer import AnswerParser, NotHttp

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
LAST = b"0\r\n\r\n"


def _encoded(pieces: list[bytes], extension: bytes = b"", trailer: bytes = b"") -> bytes:
    chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece) for piece in pieces if piece)
    return HEAD + chunks + b"0" + extension + b"\r\n" + trailer + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.binary(max_size=40), max_size=8),
       extension=st.sampled_from([b"", b";name=value"]),
       trailer=st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: b\r\nC: d\r\n"]),
       cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=12),
       surplus=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"garbage"]))
def test_the_body_comes_whole_however_chunks_and_reads_fall(pieces, extension, trailer, cuts, surplus):
    data = _encoded(pieces, extension, trailer)
    parsed, body, start = AnswerParser(), [], 0
    for cut in sorted({cut for cut in cuts if cut <= len(data)}) + [len(data)]:
        body.append(parsed.feed(data[start:cut]))
        start = cut
    parsed.feed(surplus)
    assert b"".join(body) == b"".join(pieces)
    assert parsed.complete and parsed.keeps_connection and parsed.surplus == bool(surplus)
    assert parsed.status == 200 and parsed.headers["content-type"] == "text/event-stream"


def test_a_chunk_cut_between_reads_gives_its_first_part_at_once():
    parsed = AnswerParser()
    assert parsed.feed(HEAD + b"a\r\n01234") == b"01234"
    assert parsed.feed(b"56789\r\n") == b"56789"
    assert not parsed.complete
    assert parsed.feed(LAST) == b"" and parsed.complete


def test_many_events_in_one_read_come_as_one_piece():
    events = [b"data: {\"n\": %d}\n\n" % n for n in range(50)]
    assert AnswerParser().feed(_encoded(events)) == b"".join(events)


def test_repeated_headers_are_joined_and_names_are_in_lower_case():
    parsed = AnswerParser()
    parsed.feed(b"HTTP/1.1 404 Not Found\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n")
    assert parsed.status == 404 and parsed.headers["x-a"] == "1, 2" and parsed.complete


@pytest.mark.parametrize("body", [b"zz\r\nab\r\n", b"2\r\nabXY"])  # a size not in hex; data not ended by CRLF
def test_a_broken_body_after_a_good_head_is_told_not_raised(body):
    parsed = AnswerParser()
    parsed.feed(HEAD)
    parsed.feed(body)
    assert parsed.head_done and parsed.broken and not parsed.complete


@pytest.mark.parametrize("data", [
    b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP at all
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",  # two lengths
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"y" * 70000,  # a head without end
])
def test_a_broken_head_is_refused(data):
    with pytest.raises(NotHttp):
        AnswerParser().feed(data)


def test_a_connection_close_answer_does_not_keep_its_connection():
    parsed = AnswerParser()
    parsed.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert parsed.complete and not parsed.keeps_connection


@pytest.mark.parametrize("cut", [None, 25, 40, 107])  # (107: within the 150's own body)
def test_an_interim_answer_is_passed_over_for_the_answer_that_follows(cut):
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" \
           b"HTTP/1.1 150 Other\r\nContent-Length: 3\r\n\r\nabc" \
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    parsed, body = AnswerParser(), []
    for piece in ([data] if cut is None else [data[:cut], data[cut:]]):
        body.append(parsed.feed(piece))
    assert parsed.status == 200 and parsed.headers == {"content-length": "2"}
    assert b"".join(body) == b"{}" and parsed.complete and not parsed.surplus


def test_trailer_fields_and_spaces_around_values_stay_out_of_the_headers():
    parsed = AnswerParser()
    parsed.feed(b"HTTP/1.1 200 OK\r\nX-A:  1 \r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n")
    assert parsed.headers == {"x-a": "1", "transfer-encoding": "chunked"} and parsed.complete


@pytest.mark.parametrize("framing, ends_at_close", [
    (b"Transfer-Encoding: Chunked\r\n", False), (b"Transfer-Encoding: gzip, chunked\r\n", False),
    (b"Content-Length: 5\r\n", False), (b"", True)])
def test_only_a_body_without_length_or_chunks_ends_at_the_close(framing, ends_at_close):
    parsed = AnswerParser()
    parsed.feed(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n")
    assert parsed.ends_at_close == ends_at_close
