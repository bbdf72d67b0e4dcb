"""Splitting an unframed stream of JSON texts: pure, incremental, bounded.

OpenSIPS's event_stream writes JSON-RPC texts back to back on a TCP
connection with no framing, and a reliable-mode peer answers the same way.
A reader gets them in arbitrary pieces: a text split over several ``recv``
calls, several texts in one, whitespace between them. :class:`JsonSplitter`
turns those pieces back into whole texts, in order, without parsing them:
it follows only what decides where a text ends (brackets, and strings,
inside which brackets and escaped quotes do not count), so the caller
parses each text once, with orjson.

Top-level texts must be objects or arrays (a JSON-RPC request, response or
batch): a bare number or literal cannot be delimited on an unframed stream
(``12`` then ``34`` reads ``1234``). Anything else at the top level, a
closing bracket that does not match, or a text longer than the bound is a
:class:`JsonStreamError`: the stream cannot be trusted past that point, and
the connection is reset. The bound keeps a peer that never closes its text
from growing the buffer without limit.

This module owns the stream syntax only; it does no I/O.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_MAX_TEXT", "JsonSplitter", "JsonStreamError"]

#: The default bound on one text: a notification (at most 65457 bytes) with
#: room for an id, and the largest reply anyone should send.
DEFAULT_MAX_TEXT = 1 << 20

# What matters outside a string, inside one, and between texts.
_STRUCTURE = re.compile(rb'[{}\[\]"]')
_STRING_END = re.compile(rb'["\\]')
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_CLOSER = {ord("{"): ord("}"), ord("["): ord("]")}
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


class JsonStreamError(ValueError):
    """The stream is not a sequence of JSON texts within the bound."""


class JsonSplitter:
    """Feed it bytes as they arrive; it returns each JSON text once it is whole.

    After a :class:`JsonStreamError` the splitter is spent: :meth:`reset` it
    (for a new stream) before feeding it again.
    """

    __slots__ = ("_buf", "_closers", "_in_string", "_pos", "_start", "max_text")

    def __init__(self, max_text: int = DEFAULT_MAX_TEXT) -> None:
        if max_text < 2:
            raise ValueError(f"max_text must be at least 2, got {max_text}")
        self.max_text = max_text
        self._buf = bytearray()
        self._closers = bytearray()  # the brackets still open, as the closers they need
        self._pos = 0  # where scanning resumes in _buf (past its end after a split escape)
        self._start = -1  # where the unfinished text starts in _buf; -1: between texts
        self._in_string = False

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished text held until the rest arrives."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget everything: the next byte starts a new stream."""
        self._buf.clear()
        self._closers.clear()
        self._pos = 0
        self._start = -1
        self._in_string = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take the next piece of the stream; return the texts it completed, in order."""
        buf = self._buf
        buf += data
        texts: list[bytes] = []
        closers = self._closers
        pos = self._pos
        start = self._start
        in_string = self._in_string
        end = len(buf)
        while pos < end:
            if start < 0:
                found = _NOT_SPACE.search(buf, pos)
                if found is None:
                    pos = end
                    break
                at = found.start()
                closer = _CLOSER.get(buf[at])
                if closer is None:
                    shown = bytes(buf[at : at + 20])
                    raise JsonStreamError(
                        f"expected a JSON object or array between texts, got {shown!r}"
                    )
                start = at
                closers.append(closer)
                pos = at + 1
            elif in_string:
                found = _STRING_END.search(buf, pos)
                if found is None:
                    pos = end
                    break
                at = found.start()
                if buf[at] == _BACKSLASH:
                    pos = at + 2  # the escaped byte, maybe not here yet, never ends the string
                else:
                    in_string = False
                    pos = at + 1
            else:
                found = _STRUCTURE.search(buf, pos)
                if found is None:
                    pos = end
                    break
                at = found.start()
                char = buf[at]
                pos = at + 1
                if char == _QUOTE:
                    in_string = True
                elif char in _CLOSER:
                    closers.append(_CLOSER[char])
                elif char != closers[-1]:
                    raise JsonStreamError(
                        f"{chr(char)!r} closes a {'{' if closers[-1] == ord('}') else '['!r}"
                        f" at byte {at - start} of a text"
                    )
                else:
                    closers.pop()
                    if not closers:
                        if pos - start > self.max_text:
                            raise self._too_long(pos - start)
                        texts.append(bytes(buf[start:pos]))
                        start = -1
        # Keep only the unfinished text, so the buffer never holds what was returned.
        if start < 0:  # then pos <= end: only an escape in a string skips past the end
            del buf[:pos]
            pos = 0
        else:
            del buf[:start]
            pos -= start
            start = 0
            if len(buf) > self.max_text:
                raise self._too_long(len(buf))
        self._pos = pos
        self._start = start
        self._in_string = in_string
        return texts

    def _too_long(self, size: int) -> JsonStreamError:
        return JsonStreamError(
            f"a JSON text of {size} bytes or more, over the {self.max_text}-byte bound"
        )
