"""The NBD client's exceptions, and the names of the errnos its servers send.

Every error derives from `NbdClientError` and names the server (host:port) and the export in one
line. A server error for one command (`NbdCommandError`) leaves the connection usable; a protocol
violation, a lost connection or a timeout make it unusable (the reply stream cannot be trusted any
more), and later calls raise `NbdClientClosed`. They live apart from the client so the handshake
(`standbylib.nbd.negotiate`), the reply reader (`standbylib.nbd.client_replies`) and the pool
(`standbylib.nbd.pool`) raise the same classes; `standbylib.nbd.client` re-exports them.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from standbylib.errors import RequestError, StandbyError
from standbylib.nbd import protocol as p
from standbylib.nbd.protocol import ProtocolError

__all__ = [
    "NbdClientClosed",
    "NbdClientError",
    "NbdCommandError",
    "NbdConnectError",
    "NbdConnectionLost",
    "NbdNegotiationError",
    "NbdProtocolError",
    "NbdTimeout",
    "NbdUnknownExport",
    "errno_name",
]


class NbdClientError(StandbyError):
    """Base of the NBD client's errors. Fields: `server` ("host:port"), `export`, and per class more."""

    template = "NBD server {server}, export {export!r}: {detail}"


class NbdConnectError(NbdClientError):
    """No TCP connection: refused, unreachable, unresolvable, or no answer to the connect."""

    template = "cannot connect to NBD server {server} (export {export!r}): {detail}"


class NbdUnknownExport(NbdClientError):
    """The server has no export of that name (NBD_REP_ERR_UNKNOWN); `reason` is the server's text."""

    template = "NBD server {server} has no export {export!r}: {reason}"


class NbdNegotiationError(NbdClientError):
    """The server refused the session during the handshake (TLS required, policy, shutting down...)."""

    template = "NBD server {server} refused export {export!r}: {detail}"


class NbdProtocolError(NbdClientError, ProtocolError):
    """The server broke the protocol; the connection is unusable (its replies cannot be trusted)."""

    template = "NBD server {server} broke the protocol (export {export!r}): {detail}"


class NbdConnectionLost(NbdProtocolError):
    """The connection ended or failed while the client expected more from the server."""

    template = "NBD server {server} closed the connection (export {export!r}) {detail}"


class NbdTimeout(NbdClientError):
    """Nothing arrived from the server (or it took nothing) for `timeout` seconds."""

    template = "no reply from NBD server {server} within {timeout:g} s while {detail} (export {export!r})"


class NbdClientClosed(NbdClientError):
    """The client was closed, or broken by an earlier error, and cannot send requests."""

    template = "NBD connection to {server} (export {export!r}) is not usable: {detail}"


class NbdCommandError(NbdClientError, RequestError):
    """The server answered one command with an error; the connection goes on.

    Fields: `command` ("READ"...), `offset`, `length`, `errno` (the wire value), `error` (its name,
    e.g. "EINVAL") and `message` (the server's text from a structured error chunk, else "")."""

    template = (
        "NBD server {server}, export {export!r}: {command} of [{offset}, +{length}) failed with "
        "{error}{message_part}"
    )

    def __init__(self, **fields: Any) -> None:
        message = fields.get("message", "")
        super().__init__(message_part=f": {message}" if message else "", **fields)


def errno_name(value: int) -> str:
    """A wire errno as a name with its meaning, e.g. ``"EIO (Input/output error)"``.

    The protocol's errno values are Linux's, so the host's table names the ones NBD does not list."""
    name = p.ERRNO_NAMES.get(value) or _errno.errorcode.get(value)
    if name is None:
        return f"error {value}"
    return f"{name} ({os.strerror(value)})"
