"""SIP-like requests and replies, as pure functions (no sockets).

What the prefork proxy (:mod:`mpevent.workers.sipproxy`) understands: a
request line ``METHOD sip:user@host SIP/2.0`` and the
Via, From, To, Call-ID and CSeq headers (compact forms accepted), and a
reply that echoes them. Enough SIP to drive the demo and the load test
like a proxy's traffic, not a SIP stack.
"""

from __future__ import annotations

from dataclasses import dataclass


class BadRequest(ValueError):
    """The datagram is not a request this proxy understands (reply 400)."""


@dataclass(frozen=True, slots=True)
class SipRequest:
    method: str
    ruri: str
    via: str
    from_: str
    to: str
    call_id: str
    cseq: str


# Compact header forms (RFC 3261 section 7.3.3) map to the long ones.
_HEADERS = {
    "via": "via",
    "v": "via",
    "from": "from",
    "f": "from",
    "to": "to",
    "t": "to",
    "call-id": "call-id",
    "i": "call-id",
    "cseq": "cseq",
}
_REQUIRED = ("via", "from", "to", "call-id", "cseq")


def parse_request(data: bytes) -> SipRequest:
    """Parse ``METHOD sip:user@host SIP/2.0`` plus Via/From/To/Call-ID/CSeq.

    Raises :class:`BadRequest` naming what is wrong.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("not UTF-8") from None
    head = text.split("\r\n\r\n", 1)[0] if "\r\n" in text else text.split("\n\n", 1)[0]
    lines = head.splitlines()
    if not lines:
        raise BadRequest("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "SIP/2.0":
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    method, ruri = parts[0], parts[1]
    if not method.isalpha() or not method.isupper():
        raise BadRequest(f"bad method {method[:20]!r}")
    scheme, sep, rest = ruri.partition(":")
    user, at, host = rest.partition("@")
    if scheme not in ("sip", "sips") or not sep or not at or not user or not host:
        raise BadRequest(f"bad request URI {ruri[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(f"bad header line {line[:80]!r}")
        key = _HEADERS.get(name.strip().lower())
        if key is not None and key not in headers:  # the topmost Via is the one we answer
            headers[key] = value.strip()
    missing = [name for name in _REQUIRED if not headers.get(name)]
    if missing:
        raise BadRequest(f"missing {', '.join(missing)}")
    cseq = headers["cseq"].split()
    if len(cseq) != 2 or not cseq[0].isdigit() or cseq[1] != method:
        raise BadRequest(f"bad CSeq {headers['cseq'][:40]!r}")
    return SipRequest(
        method,
        ruri,
        headers["via"],
        headers["from"],
        headers["to"],
        headers["call-id"],
        " ".join(cseq),
    )


def build_reply(code: int, reason: str, request: SipRequest | None) -> bytes:
    """A response echoing the request's Via, From, To, Call-ID and CSeq."""
    lines = [f"SIP/2.0 {code} {reason}"]
    if request is not None:
        lines += [
            f"Via: {request.via}",
            f"From: {request.from_}",
            f"To: {request.to}",
            f"Call-ID: {request.call_id}",
            f"CSeq: {request.cseq}",
        ]
    lines += ["Server: mpevent-sipproxy", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()
