"""A mirror's settings: where it sends, how fast, what to do once done, how long to wait.

One type for all of them, built by the control socket's parser from a ``mirror`` request and
completed with the server's tunables (the request limit). A running mirror keeps its
settings in one attribute and replaces them whole when the operator changes the speed limit,
so no copy of the limit can go stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ACTIONS = ("exit", "unlink", "nothing")
# How long the mirror waits for a reply, and for the destination's close after DISC
# (FLEXNBD_MS_REQUEST_LIMIT_SECS overrides it, SPEC §6.2).
REQUEST_LIMIT_SECS = 60.0
# At most one progress line this often while a mirror runs (FLEXNBD_MIRROR_PROGRESS_SECS
# overrides it, for tests).
PROGRESS_SECS = 10.0


@dataclass(frozen=True)
class MirrorSettings:
    addr: str                        # the destination: an IP literal (normalised) ...
    port: int                        # ... and its port
    action: str = "exit"             # once completed: exit | unlink | nothing
    bind: str | None = None          # connect from this address
    max_bps: int | None = None       # average sending rate; None: no limit
    request_limit: float = REQUEST_LIMIT_SECS
    progress_interval: float = PROGRESS_SECS    # seconds between progress lines

    def with_max_bps(self, max_bps: int | None) -> MirrorSettings:
        return dataclasses.replace(self, max_bps=max_bps or None)
