"""HTTP/1.1 chunked transfer coding (RFC 9112, section 7.1) undone a read at a time.

vLLM's server writes each event of a stream as one HTTP chunk. urllib3 and http.client decode a
chunk per call, in several Python calls each; once a worker relays a thousand streams it reads many
events per socket read, and that per-chunk work was most of its CPU per event. Here one call turns
all the chunks of a read into one piece of body, with a few bytes searches per chunk.
"""

from __future__ import annotations

import re

# A chunk's size in hex, then optional extensions (";name=value"), which carry nothing vLLM sends.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")
# No size line, trailer line or trailer section is this long: more bytes without one's end is not chunked coding.
_MAX_LINE = 4096


class ChunkedCodingError(Exception):
    """The bytes break chunked transfer coding."""


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)  # what the decoder reads next


class ChunkedDecoder:
    """Feed it the bytes of a chunked body as they arrive; it returns the body bytes they complete.
    A chunk cut between two reads gives its first part at once. `done` once the last chunk (size 0)
    and its trailer section arrived; bytes after those are `surplus` (the connection is then not
    safe to reuse)."""

    def __init__(self):
        self.done = False
        self.surplus = b""
        self._reading = _SIZE
        self._unparsed = b""  # the start of a size line, trailer or data end still without its end
        self._data_left = 0  # bytes of the current chunk's data still to come

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.surplus += data
            return b""
        buffer = self._unparsed + data if self._unparsed else data
        body: list[bytes] = []
        at, end = 0, len(buffer)
        while at < end:
            if self._reading == _DATA:
                piece = buffer[at:at + self._data_left]
                body.append(piece)
                at += len(piece)
                self._data_left -= len(piece)
                if self._data_left:
                    break
                self._reading = _DATA_END
            elif self._reading == _DATA_END:
                if end - at < 2:
                    break
                if buffer[at:at + 2] != b"\r\n":
                    raise ChunkedCodingError("a chunk's data is not followed by CRLF")
                at += 2
                self._reading = _SIZE
            elif self._reading == _SIZE:
                line_end = buffer.find(b"\r\n", at)
                if line_end < 0:
                    break
                size = _SIZE_LINE.fullmatch(buffer, at, line_end)
                if size is None:
                    raise ChunkedCodingError("a chunk's size line is not a size in hex")
                at = line_end + 2
                self._data_left = int(size[1], 16)
                self._reading = _DATA if self._data_left else _TRAILER
            else:
                trailer_end = _trailer_end(buffer, at)
                if trailer_end < 0:
                    break
                self.done, self.surplus, self._unparsed = True, buffer[trailer_end:], b""
                return b"".join(body)
        self._unparsed = buffer[at:]
        if len(self._unparsed) > _MAX_LINE:
            raise ChunkedCodingError("a chunk's size line or trailer is too long")
        return b"".join(body)


def _trailer_end(buffer: bytes, at: int) -> int:
    """Where the trailer section that starts at `at` ends (after its empty line), or -1 if not yet."""
    if buffer.startswith(b"\r\n", at):
        return at + 2
    found = buffer.find(b"\r\n\r\n", at)
    return found + 4 if found >= 0 else -1
