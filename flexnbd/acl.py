"""The access control list (SPEC §8): which TCP peers may connect.

Entries are IPv4 or IPv6 addresses with an optional ``/prefix`` (1-32 for IPv4, 1-128 for
IPv6; no prefix means the single address). Host bits below the prefix are ignored, so
``10.1.2.3/8`` means ``10.0.0.0/8``. A peer is allowed when it matches any entry; an
IPv4-mapped IPv6 peer (``::ffff:a.b.c.d``, as seen by a server listening on ``::``) matches IPv4
entries as the IPv4 address it carries; the other way round, IPv6 entries see an IPv4 peer as
its v4-mapped address, so a peer gets the same answer whether the server listens on ``0.0.0.0``
or on ``::``. An empty ACL allows everyone, or no one when the server
runs with ``--default-deny``; that choice belongs to the server and survives every replacement of
the entries through the control socket.

The ACL governs TCP clients. Clients of the NBD Unix socket (``--unix``) have no IP address;
the socket file's permissions govern them.

Pure: no sockets, no I/O. An ``Acl`` is immutable; replacing the ACL builds a new one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class BadEntry(ValueError):
    """An ACL entry that is not an address with an optional valid prefix."""

    def __init__(self, entry: str) -> None:
        super().__init__(f"bad ACL entry {entry!r}")
        self.entry = entry


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_entry(entry: str) -> Network:
    """One entry -> a network. BadEntry if it is not valid."""
    addr_text, slash, prefix_text = entry.partition("/")
    try:
        addr: Address = ipaddress.ip_address(addr_text)
    except ValueError:
        raise BadEntry(entry) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise BadEntry(entry)  # fe80::1%eth0: a scope cannot match a peer address
    if not slash:
        return ipaddress.ip_network(addr)
    if not _digits(prefix_text) or len(prefix_text) > 3:
        raise BadEntry(entry)
    prefix = int(prefix_text)
    if not 1 <= prefix <= addr.max_prefixlen:
        raise BadEntry(entry)
    return ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


def parse_entries(entries: Iterable[str]) -> list[Network]:
    """Every entry parsed; BadEntry for the first bad one."""
    return [parse_entry(e) for e in entries]


def _peer_address(peer: str | Address) -> Address | None:
    if not isinstance(peer, str):
        return peer
    text = peer[1:-1] if peer.startswith("[") and peer.endswith("]") else peer
    text = text.split("%", 1)[0]  # drop an IPv6 scope id
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class Acl:
    """The entries and the default for an empty list."""

    __slots__ = ("entries", "default_deny", "_v4", "_v6")

    def __init__(self, entries: Sequence[Network] = (), default_deny: bool = False) -> None:
        self.entries: tuple[Network, ...] = tuple(entries)
        self.default_deny = default_deny
        self._v4 = [n for n in self.entries if isinstance(n, ipaddress.IPv4Network)]
        self._v6 = [n for n in self.entries if isinstance(n, ipaddress.IPv6Network)]

    @classmethod
    def from_strings(cls, entries: Iterable[str], default_deny: bool = False) -> Acl:
        return cls(parse_entries(entries), default_deny)

    def replaced(self, entries: Sequence[Network]) -> Acl:
        """A new ACL with these entries and the same default."""
        return Acl(entries, self.default_deny)

    def allows(self, peer: str | Address | None) -> bool:
        """May this peer connect? ``peer`` is an IP address (text or object); None (a Unix
        socket peer) is always allowed."""
        if peer is None:
            return True
        if not self.entries:
            return not self.default_deny
        addr = _peer_address(peer)
        if addr is None:
            return False
        if isinstance(addr, ipaddress.IPv6Address):
            mapped = addr.ipv4_mapped
            if mapped is not None and any(mapped in n for n in self._v4):
                return True
            return any(addr in n for n in self._v6)
        if any(addr in n for n in self._v4):
            return True
        # An IPv4 peer also matches an entry written as an IPv4-mapped IPv6 network.
        as_mapped = ipaddress.IPv6Address(f"::ffff:{addr}")
        return any(as_mapped in n for n in self._v6)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        deny = ", default-deny" if self.default_deny else ""
        return f"Acl([{', '.join(str(n) for n in self.entries)}]{deny})"
