"""The status line (SPEC §5.1): keys, order, booleans, the trailing space, JSON."""

from __future__ import annotations

import json

import pytest

from flexnbd.status import (
    BASE_KEYS,
    EXTRA_KEYS,
    MIGRATION_KEYS,
    RECEIVED_KEYS,
    Migration,
    Received,
    Status,
    format_value,
    parse_line,
    to_json,
    typed,
)


def test_line_exactly():
    st = Status(pid=1234, size=1048576, num_clients=3, allocation_map_method="fiemap")
    assert st.line() == ("pid=1234 size=1048576 is_mirroring=false clients_allowed=true "
                         "num_clients=3 has_control=true allocation_map_method=fiemap "
                         "handshake=newstyle \n")


def test_listen_mode_and_oldstyle():
    st = Status(pid=1, size=512, has_control=False, clients_allowed=False,
                handshake="oldstyle", allocation_map_method="pending")
    assert st.line() == ("pid=1 size=512 is_mirroring=false clients_allowed=false "
                         "num_clients=0 has_control=false allocation_map_method=pending "
                         "handshake=oldstyle \n")


def test_key_order_without_and_with_migration():
    st = Status(pid=1, size=2)
    assert [k for k, _ in st.pairs()] == [*BASE_KEYS, *EXTRA_KEYS[:2]]
    m = Migration(speed=100, duration=5, seconds_left=7, bytes_left=700)
    st = Status(pid=1, size=2, is_mirroring=True, migration=m)
    assert [k for k, _ in st.pairs()] == [*BASE_KEYS, *MIGRATION_KEYS[:4], *EXTRA_KEYS[:2]]
    m.speed_limit = 1000
    assert [k for k, _ in st.pairs()] == [*BASE_KEYS, *MIGRATION_KEYS, *EXTRA_KEYS[:2]]
    assert "is_mirroring=true" in st.line()
    assert "migration_speed=100 migration_duration=5 migration_seconds_left=7 " \
           "migration_bytes_left=700 migration_speed_limit=1000 " in st.line()
    m.destination = "[::1]:10809"
    assert [k for k, _ in st.pairs()] == [*BASE_KEYS, *MIGRATION_KEYS, *EXTRA_KEYS[:3]]
    assert st.line().endswith("handshake=newstyle migration_destination=[::1]:10809 \n")
    # (the destination only while mirroring, the outcome only once the mirror ended)
    st = Status(pid=1, size=2, migration=m, migration_outcome="unknown")
    assert [k for k, _ in st.pairs()] == [*BASE_KEYS, *EXTRA_KEYS[:2], "migration_outcome"]
    assert st.line().endswith("handshake=newstyle migration_outcome=unknown \n")
    st = Status(pid=1, size=2, migration_outcome="completed", io_error=True)
    assert [k for k, _ in st.pairs()] == [*BASE_KEYS, *EXTRA_KEYS[:2], *EXTRA_KEYS[3:]]
    assert st.line().endswith("migration_outcome=completed io_error=true \n")


def test_listen_mode_received_keys_come_last():
    st = Status(pid=1, size=8192, has_control=False, received=Received())
    assert [k for k, _ in st.pairs()] == [*BASE_KEYS, *EXTRA_KEYS[:2], *RECEIVED_KEYS]
    assert st.line().endswith("handshake=newstyle received_bytes=0 zeroed_bytes=0 "
                              "covered_bytes=0 \n")
    st = Status(pid=1, size=8192, io_error=True, received=Received(4096, 2048, 6144))
    assert [k for k, _ in st.pairs()][-4:] == ["io_error", *RECEIVED_KEYS]
    assert json.loads(to_json(st.line()))["covered_bytes"] == 6144
    # serve mode: none of them
    assert "received" not in Status(pid=1, size=2).line()


def test_migration_figures_only_while_mirroring():
    m = Migration(speed=1, duration=1, seconds_left=1, bytes_left=1)
    assert "migration" not in Status(pid=1, size=2, migration=m).line()


def test_every_pair_followed_by_one_space():
    line = Status(pid=9, size=10).line()
    assert line.endswith(" \n") and not line.endswith("  \n")
    body = line[:-1]
    assert all(pair.count("=") == 1 for pair in body.split(" ") if pair)
    assert body.split(" ")[-1] == ""
    assert "  " not in body


@pytest.mark.parametrize("bad", ["a b", "a=b", "", "x\n"])
def test_values_with_space_or_equals_are_refused(bad):
    with pytest.raises(ValueError):
        format_value(bad)
    with pytest.raises(ValueError):
        Status(pid=1, size=2, allocation_map_method=bad).line()


def test_format_value():
    assert format_value(True) == "true"
    assert format_value(False) == "false"
    assert format_value(0) == "0"
    assert format_value(1 << 63) == str(1 << 63)


def test_parse_line_round_trip():
    st = Status(pid=42, size=4096, num_clients=2, clients_allowed=False)
    parsed = parse_line(st.line())
    assert list(parsed) == [k for k, _ in st.pairs()]
    assert parsed["pid"] == "42" and parsed["clients_allowed"] == "false"
    with pytest.raises(ValueError):
        parse_line("pid=1 junk ")


def test_typed():
    assert typed("true") is True
    assert typed("false") is False
    assert typed("123") == 123
    assert typed("1.5") == 1.5
    assert typed("fiemap") == "fiemap"
    assert typed("nan") == "nan"
    assert typed("") == ""


def test_to_json():
    line = Status(pid=7, size=1024, num_clients=1, allocation_map_method="seek").line()
    obj = json.loads(to_json(line))
    assert obj == {"pid": 7, "size": 1024, "is_mirroring": False, "clients_allowed": True,
                   "num_clients": 1, "has_control": True, "allocation_map_method": "seek",
                   "handshake": "newstyle"}
    assert list(obj) == [*BASE_KEYS, *EXTRA_KEYS[:2]]
