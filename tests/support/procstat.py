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
