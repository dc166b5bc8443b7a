"""HTTP/1.1 chunked coding undone a read at a time (chunked.py): the same body however the chunks
and the reads fall, the end told, and broken framing refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dce_proxy.chunked import ChunkedCodingError, ChunkedDecoder


def _encoded(pieces: list[bytes], extension: bytes = b"", trailer: bytes = b"") -> bytes:
    chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece) for piece in pieces if piece)
    return chunks + b"0" + extension + b"\r\n" + trailer + b"\r\n"


def _decoded_in_reads(data: bytes, cuts: list[int]) -> tuple[bytes, ChunkedDecoder]:
    decoder, body, start = ChunkedDecoder(), [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        body.append(decoder.feed(data[start:cut]))
        start = cut
    return b"".join(body), decoder


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.binary(max_size=40), max_size=8),
       extension=st.sampled_from([b"", b";name=value", b" ;x"]),
       trailer=st.sampled_from([b"", b"X-Trailer: 1\r\n", b"A: b\r\nC: d\r\n"]),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       surplus=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]))
def test_the_body_comes_whole_however_chunks_and_reads_fall(pieces, extension, trailer, cuts, surplus):
    data = _encoded(pieces, extension, trailer)
    body, decoder = _decoded_in_reads(data + surplus, [cut for cut in cuts if cut <= len(data)])
    assert body == b"".join(pieces)
    assert decoder.done and decoder.surplus == surplus


def test_a_chunk_cut_between_reads_gives_its_first_part_at_once():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"a\r\n01234") == b"01234"
    assert decoder.feed(b"56789\r\n") == b"56789"
    assert not decoder.done
    assert decoder.feed(b"0\r\n\r\n") == b"" and decoder.done


def test_many_events_in_one_read_come_as_one_piece():
    events = [b"data: {\"n\": %d}\n\n" % n for n in range(50)]
    assert ChunkedDecoder().feed(_encoded(events)[:-5]) == b"".join(events)


@pytest.mark.parametrize("data", [
    b"zz\r\nab\r\n",  # not hex
    b"-1\r\n",  # not a size
    b"0x2\r\nab\r\n",  # not as HTTP writes it
    b"2\r\nabXY",  # data not ended by CRLF
    b"1" * 5000,  # a size line without end
])
def test_broken_framing_is_refused(data):
    with pytest.raises(ChunkedCodingError):
        ChunkedDecoder().feed(data)


def test_a_trailer_without_end_is_refused_once_too_long():
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\nX-Long: ")
    with pytest.raises(ChunkedCodingError):
        decoder.feed(b"y" * 5000)
