"""What /proc tells about a process's threads."""

from __future__ import annotations

from pathlib import Path


def thread_status(pid: int, key: str) -> list[str]:
    """The value of ``key`` (a /proc/PID/task/TID/status field) for each thread of ``pid``."""
    found = []
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:          # a thread that just ended
            continue
        for line in text.splitlines():
            if line.startswith(key + ":"):
                found.append(line.split()[1])
    return found


def tcp_unread_bytes(port: int) -> int:
    """The bytes waiting, unread, in the receive queues of the established TCP connections
    whose local port is ``port`` (/proc/net/tcp and tcp6): what a frozen server was sent."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":   # ESTABLISHED
                total += int(queues.split(":")[1], 16)
    return total
