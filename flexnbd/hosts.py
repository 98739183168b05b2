"""Host names and addresses as an operator types them: ``10.0.0.2``, ``[::1]``, ``db1.example``,
``0`` (every address).

A host is kept as it was typed (a literal normalised, a name in lower case) and resolved once,
by the part that uses it: a listener binds every address the name has, a client tries each in
the resolver's order until one connects. What was typed stays the name a TLS certificate must
carry; the address actually used goes to the log.

``0`` (0.5.0's "any address") and ``::`` listen on every address of both families where the
system allows it (one IPv6 socket that also takes IPv4, ``IPV6_V6ONLY`` off); ``0.0.0.0`` is
IPv4 only, as written.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from flexnbd.errors import FlexnbdError

ANY = "0"                    # every address, both families (0.5.0 spelled it this way)
ANY_ADDRESSES = {"0": ANY, "0.0.0.0": "0.0.0.0"}
# RFC 1123 labels: letters, digits, hyphens inside; at most 63 bytes each, 253 in all.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.ASCII)


def parse_host(text: str) -> str:
    """An IPv4 or IPv6 literal (brackets allowed), normalised; ``0``; or a host name, in lower
    case without a trailing dot. ValueError if it is none of these."""
    if text in ANY_ADDRESSES:
        return ANY_ADDRESSES[text]
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if not 0 < len(name) <= 253 or not all(_LABEL.fullmatch(label) for label in labels) or \
            labels[-1].isdigit():     # (1.2.3.400 is a bad literal, not a name)
        raise ValueError(text)
    return name


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str) -> tuple[str, ...]:
    """Every address of ``host``, once each, in the resolver's order (a literal is its own).
    FlexnbdError, saying why, if the name has none."""
    if host == ANY:
        return ("::",)
    if is_literal(host):
        return (host,)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
        raise FlexnbdError(f"cannot resolve {host!r}: {reason}") from None
    addresses: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    if not addresses:
        raise FlexnbdError(f"cannot resolve {host!r}: it has no IPv4 or IPv6 address")
    return tuple(addresses)


def described(host: str, addresses: tuple[str, ...]) -> str:
    """``db1.example (10.0.0.5, fd00::5)`` for a log line; a literal alone as itself."""
    if addresses == (host,):
        return host
    return f"{host} ({', '.join(addresses)})"
