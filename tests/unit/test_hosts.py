"""flexnbd.hosts: what is a host as typed, and how it is named in the log."""

from __future__ import annotations

import pytest

from flexnbd import hosts


@pytest.mark.parametrize("text,host", [
    ("127.0.0.1", "127.0.0.1"),
    ("[::1]", "::1"),
    ("0:0::1", "::1"),
    ("0", hosts.ANY),
    ("::", "::"),                      # (listens on both families too)
    ("0.0.0.0", "0.0.0.0"),            # IPv4 only, as written
    ("localhost", "localhost"),
    ("DB1.Example.", "db1.example"),
    ("a-b.c-d.example", "a-b.c-d.example"),
    ("x" * 63 + ".example", "x" * 63 + ".example"),
])
def test_parse_host(text, host):
    assert hosts.parse_host(text) == host


@pytest.mark.parametrize("text", [
    "", ".", "-a.example", "a-.example", "a..example", "a_b.example", "a b", "é.example",
    "x" * 64 + ".example", ".".join(["abcdefgh"] * 30), "1.2.3.400", "256.1.1.1", "[1.2.3.4",
    "::g", "a.example/24",
])
def test_parse_host_refuses(text):
    with pytest.raises(ValueError):
        hosts.parse_host(text)


def test_resolve_literals_without_a_lookup():
    assert hosts.resolve("10.0.0.2") == ("10.0.0.2",)
    assert hosts.resolve("::1") == ("::1",)
    assert hosts.resolve(hosts.ANY) == ("::",)


def test_described():
    assert hosts.described("10.0.0.2", ("10.0.0.2",)) == "10.0.0.2"
    assert hosts.described("db1.example", ("10.0.0.5", "fd00::5")) == \
        "db1.example (10.0.0.5, fd00::5)"
