"""NBD fixed newstyle negotiation: options, export selection, structured replies, base:allocation.

`negotiate` speaks the handshake on one connection's blocking socket and returns the `Session` the
client settled on (None when it aborted). Option errors get an error reply and negotiation goes on; a
broken frame (bad magic, unknown client flags, an oversize option) raises `ProtocolError`, which ends
the connection.

TLS (``tls``, a `ServerTls`): NBD_OPT_STARTTLS is acknowledged, the TLS handshake runs on the same
socket (`TlsConnection`) and option haggling starts afresh inside TLS (what was negotiated before is
forgotten, as the spec asks). When TLS is required, every other option before it is answered
NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which has no error reply, ends the connection). Without
``tls`` NBD_OPT_STARTTLS is answered NBD_REP_ERR_UNSUP like any unknown option.

Access (an `ExportAccess` of the `ExportTable`): before an export is looked up for NBD_OPT_INFO, GO or a
meta context, the owner is asked whether this client (its certificate, once TLS is up) may open it; a
refusal is answered NBD_REP_ERR_POLICY, for an export that does not exist too (NBD_OPT_EXPORT_NAME, which
has no error reply, ends the connection), and NBD_OPT_LIST names only the exports the client may open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from standbylib.blockdev import BlockDevice
from standbylib.nbd import protocol as p
from standbylib.nbd.protocol import ProtocolError
from standbylib.nbd.sockio import SocketReader, SocketWriter
from standbylib.nbd.tls import ServerTls, TlsConnection

#: Largest READ/WRITE payload served, advertised as the maximum block size (NBD_INFO_BLOCK_SIZE); larger
#: requests get EINVAL (a WRITE's payload is consumed and dropped) and the connection goes on. 64 MiB as
#: nbdkit: qemu and libnbd clients never send more than the advertised maximum.
MAX_REQUEST = 64 << 20
#: Largest option payload accepted during the handshake; larger ones end the connection.
MAX_OPTION = 64 << 10
#: Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
PREFERRED_BLOCK_SIZE = 4096
#: Metadata context id of base:allocation (the only context offered).
BASE_ALLOCATION_ID = 1

Exports = Mapping[str, BlockDevice] | Callable[[str], BlockDevice | None]
#: The client's certificate as ``ssl`` gives it (``getpeercert()``): None before or without TLS, empty
#: when the client presented none.
PeerCertificate = Mapping[str, Any] | None


class ExportAccess(Protocol):
    """Which exports a client may open, by its certificate (the server's owner decides; the NBD layer
    only asks). Called from connection threads during their handshake."""

    def refusal(self, name: str, peer: PeerCertificate) -> str | None:
        """None when the client may open export `name`, else why not: it is answered
        NBD_REP_ERR_POLICY with that text, whether the export exists or not."""
        ...

    def listed(self, name: str, peer: PeerCertificate) -> bool:
        """Whether NBD_OPT_LIST names export `name` to the client."""
        ...


class ExportTable:
    """The exports as a mapping or as a lookup callable (then `list_exports` names them for
    NBD_OPT_LIST; without it the list is empty), and who may open them (`access`; None: everyone).
    Called from connection threads."""

    def __init__(
        self,
        exports: Exports,
        list_exports: Callable[[], list[str]] | None = None,
        access: ExportAccess | None = None,
    ) -> None:
        self._exports = exports
        self._list_exports = list_exports
        self._access = access

    def refusal(self, name: str, peer: PeerCertificate) -> str | None:
        """Why the client may not open export `name` (`ExportAccess.refusal`), None when it may."""
        return None if self._access is None else self._access.refusal(name, peer)

    def lookup(self, name: str) -> BlockDevice | None:
        if isinstance(self._exports, Mapping):
            return self._exports.get(name)
        return self._exports(name)

    def names(self, peer: PeerCertificate = None) -> list[str]:
        if isinstance(self._exports, Mapping):
            names = list(self._exports)
        else:
            names = list(self._list_exports()) if self._list_exports is not None else []
        access = self._access
        return names if access is None else [n for n in names if access.listed(n, peer)]


@dataclass
class Session:
    """What one connection negotiated."""

    no_zeroes: bool = False
    structured: bool = False
    meta_export: str | None = None  # export the selected contexts apply to
    meta_allocation: bool = False
    name: str = ""
    device: BlockDevice | None = None
    flags: int = 0  # transmission flags sent for the export
    peer: PeerCertificate = None  # the client's certificate, once TLS is up

    def select(self, name: str, device: BlockDevice) -> None:
        self.name = name
        self.device = device
        self.flags = transmission_flags(device, structured=self.structured)
        if self.meta_export != name:
            self.meta_allocation = False


def transmission_flags(device: BlockDevice, *, structured: bool) -> int:
    """The transmission flags of `device`'s export.

    A read-only export advertises no command that writes or makes writes durable (FLUSH, FUA, TRIM,
    WRITE_ZEROES), as ``nbdkit -r`` does: clients then never send them (if they do, writes get EPERM
    and FUA EINVAL). DF (a READ answered with one data chunk) needs structured replies, so it is
    advertised only once they are negotiated. FAST_ZERO is not offered."""
    flags = p.FLAG_HAS_FLAGS | p.FLAG_CAN_MULTI_CONN
    if device.readonly:
        flags |= p.FLAG_READ_ONLY
    else:
        flags |= p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES
    if structured:
        flags |= p.FLAG_SEND_DF
    return flags


def command_flags(transmission: int) -> dict[int, int]:
    """Command -> the command flags a request of it may carry on an export with these transmission
    flags (doc/proto.md, "Command flags"); a request with any other flag gets EINVAL.

    FUA is valid on every command once SEND_FUA is advertised (the spec says servers MUST accept it,
    "even by ignoring the bit"; it only matters on writes); NO_HOLE only on WRITE_ZEROES; DF only on
    READ with SEND_DF; REQ_ONE only on BLOCK_STATUS; FAST_ZERO never (not advertised)."""
    fua = p.CMD_FLAG_FUA if transmission & p.FLAG_SEND_FUA else 0
    df = p.CMD_FLAG_DF if transmission & p.FLAG_SEND_DF else 0
    return {
        p.CMD_READ: fua | df,
        p.CMD_WRITE: fua,
        p.CMD_FLUSH: fua,
        p.CMD_TRIM: fua,
        p.CMD_WRITE_ZEROES: fua | p.CMD_FLAG_NO_HOLE,
        p.CMD_BLOCK_STATUS: fua | p.CMD_FLAG_REQ_ONE,
    }


def negotiate(
    reader: SocketReader,
    writer: SocketWriter,
    exports: ExportTable,
    min_block: int,
    tls: ServerTls | None = None,
    start_tls: Callable[[bytes], TlsConnection] | None = None,
) -> Session | None:
    """Negotiate options; the session when an export was chosen and transmission begins, else None.

    With `tls`, `start_tls` runs the server's TLS handshake on the connection (given the bytes already
    received after NBD_OPT_STARTTLS) and returns the TLS connection the reader and writer switch to."""
    secured = False
    writer.send([p.GREETING.pack(p.INIT_MAGIC, p.OPTS_MAGIC, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)])
    (client_flags,) = reader.unpack(p.CLIENT_FLAGS)
    if client_flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
        raise ProtocolError(detail=f"unknown client flags {client_flags:#x}")
    if not client_flags & p.FLAG_C_FIXED_NEWSTYLE:
        raise ProtocolError(detail="client does not support fixed newstyle negotiation")
    session = Session(no_zeroes=bool(client_flags & p.FLAG_C_NO_ZEROES))
    while True:
        magic, option, length = reader.unpack(p.OPTION_HEADER)
        if magic != p.OPTS_MAGIC:
            raise ProtocolError(detail=f"bad option magic {magic:#x}")
        if length > MAX_OPTION:
            raise ProtocolError(detail=f"option {option} carries {length} bytes, limit {MAX_OPTION}")
        data = bytes(reader.read(length)) if length else b""
        out: list[bytes] = []

        def reply(kind: int, payload: bytes = b"", option: int = option, out: list[bytes] = out) -> None:
            out.append(p.option_reply(option, kind, payload))

        if tls is not None and not secured:
            if option == p.OPT_STARTTLS and not data and start_tls is not None:
                reply(p.REP_ACK)
                writer.send(out)
                conn = start_tls(reader.take())
                reader.start_tls(conn)
                writer.start_tls(conn)
                secured = True
                # start afresh inside TLS
                session = Session(no_zeroes=session.no_zeroes, peer=conn.getpeercert())
                continue
            if tls.required and option not in (p.OPT_STARTTLS, p.OPT_ABORT):
                if option == p.OPT_EXPORT_NAME:
                    raise ProtocolError(detail="NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: TLS is required")
                reply(p.REP_ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
                writer.send(out)
                continue
        if option == p.OPT_STARTTLS:
            if secured:
                reply(p.REP_ERR_INVALID, b"TLS is already in use")
            elif tls is not None:
                reply(p.REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            else:
                reply(p.REP_ERR_UNSUP, b"TLS is not offered by this server")
            writer.send(out)
            continue

        if option == p.OPT_EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            refusal = exports.refusal(name, session.peer)
            if refusal is not None:
                raise ProtocolError(detail=f"NBD_OPT_EXPORT_NAME {name!r} refused: {refusal}")
            device = exports.lookup(name)
            if device is None:
                raise ProtocolError(detail=f"unknown export {name!r} in NBD_OPT_EXPORT_NAME")
            session.select(name, device)
            out.append(p.EXPORT_NAME_REPLY.pack(device.size, session.flags))
            if not session.no_zeroes:
                out.append(p.ZERO_PAD)
            writer.send(out)
            return session
        if option == p.OPT_ABORT:
            reply(p.REP_ACK)
            with contextlib.suppress(OSError):  # the client may be gone already; it asked to end
                writer.send(out)
            return None
        if option in (p.OPT_INFO, p.OPT_GO):
            if _info(data, option, reply, exports, session, min_block):
                writer.send(out)
                return session
        elif option == p.OPT_LIST:
            if data:
                reply(p.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            else:
                for name in exports.names(session.peer):
                    reply(p.REP_SERVER, p.pack_string(name))
                reply(p.REP_ACK)
        elif option == p.OPT_STRUCTURED_REPLY:
            if data:
                reply(p.REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                session.structured = True
                reply(p.REP_ACK)
        elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            _meta_context(option, data, reply, exports, session)
        else:
            reply(p.REP_ERR_UNSUP, f"option {option} is not supported".encode())
        writer.send(out)


Reply = Callable[[int, bytes], None]


def _info(
    data: bytes, option: int, reply: Reply, exports: ExportTable, session: Session, min_block: int
) -> bool:
    """Answer NBD_OPT_INFO / NBD_OPT_GO; True when GO succeeded."""
    try:
        name, requests = _parse_info(data)
    except ProtocolError as e:
        reply(p.REP_ERR_INVALID, str(e).encode())
        return False
    refusal = exports.refusal(name, session.peer)
    if refusal is not None:
        reply(p.REP_ERR_POLICY, refusal.encode())
        return False
    device = exports.lookup(name)
    if device is None:
        reply(p.REP_ERR_UNKNOWN, f"unknown export {name!r}".encode())
        return False
    del requests  # block sizes are sent whether asked or not, as the spec allows
    flags = transmission_flags(device, structured=session.structured)
    export = p.INFO_EXPORT_STRUCT.pack(p.INFO_EXPORT, device.size, flags)
    sizes = p.INFO_BLOCK_SIZE_STRUCT.pack(
        p.INFO_BLOCK_SIZE, min_block, max(min_block, PREFERRED_BLOCK_SIZE), MAX_REQUEST
    )
    reply(p.REP_INFO, export)
    reply(p.REP_INFO, sizes)
    reply(p.REP_ACK, b"")
    if option == p.OPT_GO:
        session.select(name, device)
        return True
    return False


def _meta_context(option: int, data: bytes, reply: Reply, exports: ExportTable, session: Session) -> None:
    if not session.structured:
        reply(p.REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
        return
    try:
        name, queries = _parse_meta(data)
    except ProtocolError as e:
        reply(p.REP_ERR_INVALID, str(e).encode())
        return
    refusal = exports.refusal(name, session.peer)
    if refusal is not None:
        reply(p.REP_ERR_POLICY, refusal.encode())
        return
    if exports.lookup(name) is None:
        reply(p.REP_ERR_UNKNOWN, f"unknown export {name!r}".encode())
        return
    if option == p.OPT_SET_META_CONTEXT:
        selected = p.META_BASE_ALLOCATION in queries
    else:
        selected = not queries or any(q in ("base:", p.META_BASE_ALLOCATION) for q in queries)
    if selected:
        ctx_id = BASE_ALLOCATION_ID if option == p.OPT_SET_META_CONTEXT else 0
        reply(p.REP_META_CONTEXT, p.U32.pack(ctx_id) + p.META_BASE_ALLOCATION.encode())
    if option == p.OPT_SET_META_CONTEXT:
        session.meta_export = name
        session.meta_allocation = selected
    reply(p.REP_ACK, b"")


def _parse_info(data: bytes) -> tuple[str, list[int]]:
    name, rest = _take_string(data)
    if len(rest) < 2:
        raise ProtocolError(detail="NBD_OPT_INFO/GO data truncated")
    (count,) = p.U16.unpack_from(rest)
    if len(rest) != 2 + 2 * count:
        raise ProtocolError(detail="NBD_OPT_INFO/GO information request count does not match length")
    return name, [p.U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)]


def _parse_meta(data: bytes) -> tuple[str, list[str]]:
    name, rest = _take_string(data)
    if len(rest) < 4:
        raise ProtocolError(detail="meta context data truncated")
    (count,) = p.U32.unpack_from(rest)
    rest = rest[4:]
    queries = []
    for _ in range(count):
        query, rest = _take_string(rest)
        queries.append(query)
    if rest:
        raise ProtocolError(detail="meta context data has trailing bytes")
    return name, queries


def _take_string(data: bytes) -> tuple[str, bytes]:
    if len(data) < 4:
        raise ProtocolError(detail="string length truncated")
    (n,) = p.U32.unpack_from(data)
    if len(data) < 4 + n:
        raise ProtocolError(detail="string truncated")
    try:
        text = data[4 : 4 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(detail="string is not UTF-8") from e
    return text, data[4 + n :]
