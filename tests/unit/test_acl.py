"""The ACL (SPEC §8) without sockets: entries, prefixes, v4-mapped peers, default-deny."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexnbd.acl import Acl, BadEntry, parse_entries, parse_entry


@pytest.mark.parametrize("entry,network", [
    ("127.0.0.1", "127.0.0.1/32"),
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3/8", "10.0.0.0/8"),          # host bits ignored
    ("192.168.1.0/24", "192.168.1.0/24"),
    ("0.0.0.0/1", "0.0.0.0/1"),
    ("1.2.3.4/32", "1.2.3.4/32"),
    ("::1", "::1/128"),
    ("::1/128", "::1/128"),
    ("fe80::/10", "fe80::/10"),
    ("2001:db8::1/32", "2001:db8::/32"),
    ("::/1", "::/1"),
    ("::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
])
def test_good_entries(entry, network):
    assert parse_entry(entry) == ipaddress.ip_network(network)


@pytest.mark.parametrize("entry", [
    "", "foo", "localhost", "1.2.3", "1.2.3.4.5", "256.1.1.1", "1.2.3.4/", "1.2.3.4/0",
    "1.2.3.4/33", "1.2.3.4/-1", "1.2.3.4/+8", "1.2.3.4/ 8", "1.2.3.4/8/8", "1.2.3.4/x",
    "::1/0", "::1/129", "::1/1000", "1.2.3.4/٣", "1.2.3.4/８", " 1.2.3.4", "1.2.3.4 ",
    "fe80::1%eth0", "[::1]", "1.2.3.4/0008", "1.2.3.4\n",
])
def test_bad_entries(entry):
    with pytest.raises(BadEntry) as info:
        parse_entry(entry)
    assert info.value.entry == entry


def test_parse_entries_names_the_first_bad_one():
    with pytest.raises(BadEntry) as info:
        parse_entries(["127.0.0.1", "nope", "also-bad"])
    assert info.value.entry == "nope"
    assert parse_entries([]) == []


def test_empty_acl_allows_everyone_unless_default_deny():
    assert Acl().allows("127.0.0.1")
    assert Acl().allows("::1")
    assert not Acl(default_deny=True).allows("127.0.0.1")
    assert not Acl(default_deny=True).allows("::1")


def test_unix_peers_are_always_allowed():
    assert Acl.from_strings(["10.0.0.1"]).allows(None)
    assert Acl(default_deny=True).allows(None)


@pytest.mark.parametrize("entries,peer,allowed", [
    (["127.0.0.1"], "127.0.0.1", True),
    (["127.0.0.1"], "127.0.0.2", False),
    (["127.0.0.0/8"], "127.255.255.254", True),
    (["127.0.0.0/30"], "127.0.0.3", True),
    (["127.0.0.0/30"], "127.0.0.4", False),
    (["10.0.0.0/8", "192.168.0.0/16"], "192.168.44.1", True),
    (["10.0.0.0/8", "192.168.0.0/16"], "172.16.0.1", False),
    (["::1"], "::1", True),
    (["::1"], "::2", False),
    (["2001:db8::/32"], "2001:db8:ffff::1", True),
    (["2001:db8::/32"], "2001:db9::1", False),
    # IPv4-mapped IPv6 peers (a server on ::) match IPv4 entries
    (["127.0.0.1"], "::ffff:127.0.0.1", True),
    (["10.0.0.0/8"], "::ffff:10.20.30.40", True),
    (["10.0.0.0/8"], "::ffff:11.0.0.1", False),
    # ... and IPv4 entries never match real IPv6 peers
    (["0.0.0.0/1", "128.0.0.0/1"], "::1", False),
    (["0.0.0.1"], "::1", False),
    # An IPv4 peer is seen as its v4-mapped form by IPv6 entries (as a server on :: sees it),
    # so only IPv6 networks that hold ::ffff:0:0/96 addresses match it.
    (["8000::/1"], "127.0.0.1", False),
    (["2001:db8::/32"], "127.0.0.1", False),
    (["::/1"], "127.0.0.1", True),
    (["::ffff:127.0.0.0/104"], "127.0.0.1", True),
    (["::ffff:127.0.0.0/104"], "::ffff:127.0.0.1", True),
    # peers given as bracketed or scoped text
    (["::1"], "[::1]", True),
    (["fe80::/10"], "fe80::1%lo", True),
    # something that is not an address never matches a non-empty ACL
    (["127.0.0.1"], "?", False),
    (["127.0.0.1"], "", False),
])
def test_matching(entries, peer, allowed):
    assert Acl.from_strings(entries).allows(peer) is allowed
    assert Acl.from_strings(entries, default_deny=True).allows(peer) is allowed


def test_address_objects_are_accepted():
    acl = Acl.from_strings(["10.0.0.0/8"])
    assert acl.allows(ipaddress.ip_address("10.1.1.1"))
    assert not acl.allows(ipaddress.ip_address("11.1.1.1"))


def test_replacement_keeps_default_deny():
    acl = Acl.from_strings(["10.0.0.1"], default_deny=True)
    assert not acl.allows("127.0.0.1")
    allowed = acl.replaced(parse_entries(["127.0.0.1"]))
    assert allowed.default_deny and allowed.allows("127.0.0.1")
    emptied = allowed.replaced([])
    assert emptied.default_deny and not emptied.allows("127.0.0.1")
    open_acl = Acl.from_strings(["10.0.0.1"]).replaced([])
    assert not open_acl.default_deny and open_acl.allows("127.0.0.1")
    # the original is untouched
    assert acl.entries == (ipaddress.ip_network("10.0.0.1/32"),)


def test_repr_and_len():
    acl = Acl.from_strings(["10.0.0.0/8", "::1"], default_deny=True)
    assert len(acl) == 2
    assert repr(acl) == "Acl([10.0.0.0/8, ::1/128], default-deny)"


@given(st.ip_addresses(v=4), st.integers(1, 32))
def test_ipv4_prefix_property(addr, prefix):
    network = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    acl = Acl.from_strings([f"{addr}/{prefix}"])
    assert acl.allows(str(addr))
    assert acl.allows(f"::ffff:{addr}")
    outside = int(network.broadcast_address) + 1
    if outside < 1 << 32:
        assert not acl.allows(str(ipaddress.IPv4Address(outside)))


@given(st.ip_addresses(v=6), st.integers(1, 128))
def test_ipv6_prefix_property(addr, prefix):
    network = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    acl = Acl.from_strings([f"{addr}/{prefix}"])
    assert acl.allows(str(addr))
    outside = int(network.broadcast_address) + 1
    if outside < 1 << 128:
        assert not acl.allows(str(ipaddress.IPv6Address(outside)))
