# cython: language_level=3
"""The NBD wire constants for Python, from _wire.pxd, their one home.

The ``cpdef enum`` members of _wire.pxd are this module's attributes already; the constants
that no C int holds (64-bit magics, option reply errors with the high bit set) are added here by
name. flexnbd/wire.py re-exports all of them next to the struct helpers.
"""

globals().update(
    NBDMAGIC=NBDMAGIC,
    OLDSTYLE_MAGIC=OLDSTYLE_MAGIC,
    IHAVEOPT=IHAVEOPT,
    OPTION_REPLY_MAGIC=OPTION_REPLY_MAGIC,
    MIRROR_COOKIE=MIRROR_COOKIE,
    REP_ERR_UNSUP=REP_ERR_UNSUP,
    REP_ERR_POLICY=REP_ERR_POLICY,
    REP_ERR_INVALID=REP_ERR_INVALID,
    REP_ERR_PLATFORM=REP_ERR_PLATFORM,
    REP_ERR_TLS_REQD=REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN=REP_ERR_UNKNOWN,
    REP_ERR_SHUTDOWN=REP_ERR_SHUTDOWN,
    REP_ERR_BLOCK_SIZE_REQD=REP_ERR_BLOCK_SIZE_REQD,
    REP_ERR_TOO_BIG=REP_ERR_TOO_BIG,
)
