"""NBD export of block devices (see ARCHITECTURE.md section 4)."""

from standbylib.nbd.server import ERRNO_TABLE, NbdServer, errno_for

__all__ = ["ERRNO_TABLE", "NbdServer", "errno_for"]
