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

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_TEXT",
    "MISMATCH",
    "MORE",
    "BracketScan",
    "JsonSplitter",
    "JsonStreamError",
]

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
_OBJECT_CLOSE = ord("}")

# What BracketScan.scan found.
CLOSED, MISMATCH, MORE = range(3)


class JsonStreamError(ValueError):
    """The stream is not a sequence of JSON texts within the bound."""


class BracketScan:
    """Where one JSON object or array ends, followed piece by piece.

    It knows only the brackets still open and whether it is inside a string
    (where brackets and escaped quotes do not count): the one piece of JSON
    syntax that says where a text ends. :class:`JsonSplitter` and the MI
    FIFO's request splitter both read their texts with it.
    """

    __slots__ = ("closers", "in_string")

    def __init__(self) -> None:
        self.closers = bytearray()  # the brackets still open, as the closers they need
        self.in_string = False

    def begin(self, opener: int) -> bool:
        """Start a text at byte ``opener``; False when it is not ``{`` or ``[``."""
        closer = _CLOSER.get(opener)
        if closer is None:
            return False
        self.closers[:] = bytes((closer,))
        self.in_string = False
        return True

    def open_bracket(self) -> str:
        """The innermost bracket still open, as it was written."""
        return "{" if self.closers and self.closers[-1] == _OBJECT_CLOSE else "["

    def scan(self, buf: bytearray, pos: int, end: int) -> tuple[int, int]:
        """Follow ``buf[pos:end]``, the text begun with :meth:`begin`. Returns
        ``(after its last byte, CLOSED)``, ``(the offending byte, MISMATCH)``
        for a closing bracket that does not match, or ``(where to resume,
        MORE)``: past ``end`` when an escape's second byte is still to come."""
        closers = self.closers
        in_string = self.in_string
        while pos < end:
            if in_string:
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
                continue
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
                self.in_string = False
                return at, MISMATCH
            else:
                closers.pop()
                if not closers:
                    self.in_string = False
                    return pos, CLOSED
        self.in_string = in_string
        return pos, MORE


class JsonSplitter:
    """Feed it bytes as they arrive; it returns each JSON text once it is whole.

    After a :class:`JsonStreamError` the splitter is spent: :meth:`reset` it
    (for a new stream) before feeding it again.
    """

    __slots__ = ("_buf", "_pos", "_scan", "_start", "max_text")

    def __init__(self, max_text: int = DEFAULT_MAX_TEXT) -> None:
        if max_text < 2:
            raise ValueError(f"max_text must be at least 2, got {max_text}")
        self.max_text = max_text
        self._buf = bytearray()
        self._scan = BracketScan()
        self._pos = 0  # where scanning resumes in _buf (past its end after a split escape)
        self._start = -1  # where the unfinished text starts in _buf; -1: between texts

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished text held until the rest arrives."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget everything: the next byte starts a new stream."""
        self._buf.clear()
        self._scan = BracketScan()
        self._pos = 0
        self._start = -1

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take the next piece of the stream; return the texts it completed, in order."""
        buf = self._buf
        buf += data
        texts: list[bytes] = []
        scan = self._scan
        pos = self._pos
        start = self._start
        end = len(buf)
        while pos < end:
            if start < 0:
                found = _NOT_SPACE.search(buf, pos)
                if found is None:
                    pos = end
                    break
                at = found.start()
                if not scan.begin(buf[at]):
                    shown = bytes(buf[at : at + 20])
                    raise JsonStreamError(
                        f"expected a JSON object or array between texts, got {shown!r}"
                    )
                start = at
                pos = at + 1
                continue
            pos, state = scan.scan(buf, pos, end)
            if state == MISMATCH:
                raise JsonStreamError(
                    f"{chr(buf[pos])!r} closes a {scan.open_bracket()!r}"
                    f" at byte {pos - start} of a text"
                )
            if state == MORE:
                break
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
        return texts

    def _too_long(self, size: int) -> JsonStreamError:
        return JsonStreamError(
            f"a JSON text of {size} bytes or more, over the {self.max_text}-byte bound"
        )
