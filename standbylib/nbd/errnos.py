"""Library exceptions -> NBD errno values, in one table (errors are translated once, at the edge)."""

from __future__ import annotations

from standbylib.errors import (
    DiskFull,
    InvalidArgument,
    InvalidLength,
    OutOfRange,
    PreservationFull,
    ReadOnly,
    RequestError,
    StandbyError,
)
from standbylib.nbd import protocol as p

#: Library exception -> NBD errno, most specific first. Anything not listed is EIO (and logged).
ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (ReadOnly, p.EPERM),
    (OutOfRange, p.EINVAL),
    (InvalidLength, p.EINVAL),
    (InvalidArgument, p.EINVAL),
    (PreservationFull, p.ENOSPC),
    (DiskFull, p.ENOSPC),
    (RequestError, p.EIO),
    (StandbyError, p.EIO),
)

#: Commands that change the export.
WRITING = frozenset({p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES})


def errno_for(exc: BaseException, command: int) -> int:
    """The errno to send for `exc` raised while serving `command`.

    The spec asks for ENOSPC (not EINVAL) when a write reaches past the end of the export.
    """
    if isinstance(exc, OutOfRange) and command in WRITING:
        return p.ENOSPC
    for kind, value in ERRNO_TABLE:
        if isinstance(exc, kind):
            return value
    return p.EIO
