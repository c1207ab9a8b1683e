"""NBD export of block devices (docs/NBD.md).

Modules: `protocol` (wire constants and structs), `handshake` (option negotiation), `transmission`
(the requests of a connection), `replies` (reply parts), `server` (listening socket and threads),
`sockio` (buffered socket I/O, shared by server and client), `errnos` (library exceptions -> errno),
`tls` (STARTTLS over memory BIOs). The reading client of the backup node: `client` (`NbdClient`),
`client_errors` (its exceptions), `negotiate` (TCP connect and the client's side of the handshake),
`client_replies` (requests in flight and their replies) and `pool` (`NbdPool`). Devices may offer
read plans (`standbylib.readplan`) for the fast read path; docs/NBD.md describes the design.
"""

from standbylib.nbd.client import NbdClient
from standbylib.nbd.client_errors import (
    NbdClientClosed,
    NbdClientError,
    NbdCommandError,
    NbdConnectError,
    NbdConnectionLost,
    NbdNegotiationError,
    NbdProtocolError,
    NbdTimeout,
    NbdUnknownExport,
)
from standbylib.nbd.client_replies import Extent
from standbylib.nbd.pool import NbdPool
from standbylib.nbd.server import ERRNO_TABLE, NbdServer, errno_for
from standbylib.readplan import PlanSource, ReadPlan

__all__ = [
    "ERRNO_TABLE",
    "Extent",
    "NbdClient",
    "NbdClientClosed",
    "NbdClientError",
    "NbdCommandError",
    "NbdConnectError",
    "NbdConnectionLost",
    "NbdNegotiationError",
    "NbdPool",
    "NbdProtocolError",
    "NbdServer",
    "NbdTimeout",
    "NbdUnknownExport",
    "PlanSource",
    "ReadPlan",
    "errno_for",
]
