"""NBD wire constants and struct helpers (fixed newstyle handshake, simple and structured replies).

Values are those of ``doc/proto.md`` in the NetworkBlockDevice/nbd repository. All integers travel in
network byte order. Nothing here does I/O: the server reads and writes the bytes these helpers pack and
unpack, so the same helpers serve tests that speak the protocol over a raw socket.
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import Final

from standbylib.errors import StandbyError

# -- magics ---------------------------------------------------------------------------------------------

INIT_MAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
OPTS_MAGIC: Final = 0x49484156454F5054  # "IHAVEOPT"
REP_MAGIC: Final = 0x0003E889045565A9  # option reply
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# -- handshake flags (server, 16 bits) and client flags (32 bits) ---------------------------------------

FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# -- transmission flags (16 bits, per export) -----------------------------------------------------------

FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# -- options --------------------------------------------------------------------------------------------

OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_PEEK_EXPORT: Final = 4
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

# -- option replies -------------------------------------------------------------------------------------

REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

# -- information types (NBD_OPT_INFO / NBD_OPT_GO) ------------------------------------------------------

INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# -- commands and command flags -------------------------------------------------------------------------

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
CMD_RESIZE: Final = 8

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# -- structured replies ---------------------------------------------------------------------------------

REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) | 2

# -- base:allocation ------------------------------------------------------------------------------------

META_BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# -- errno values on the wire (fixed by the protocol, not the host's numbering) -------------------------

EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

ERRNO_NAMES: Final = {
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# The wire values equal Linux's; guard against a port to a platform where they differ being surprised.
assert (_errno.EPERM, _errno.EIO, _errno.EINVAL, _errno.ENOSPC) == (EPERM, EIO, EINVAL, ENOSPC)

# -- structs --------------------------------------------------------------------------------------------

#: Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING = struct.Struct(">QQH")
#: Client flags after the greeting.
CLIENT_FLAGS = struct.Struct(">I")
#: Option request header: IHAVEOPT, option, data length.
OPTION_HEADER = struct.Struct(">QII")
#: Option reply header: magic, option, reply type, data length.
OPTION_REPLY = struct.Struct(">QIII")
#: Reply to NBD_OPT_EXPORT_NAME: size, transmission flags (then 124 zero bytes unless NO_ZEROES).
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: NBD_INFO_EXPORT payload: info type, size, transmission flags.
INFO_EXPORT_STRUCT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE payload: info type, minimum, preferred, maximum.
INFO_BLOCK_SIZE_STRUCT = struct.Struct(">HIII")
#: Request header: magic, command flags, type, cookie, offset, length.
REQUEST = struct.Struct(">IHHQQI")
#: Simple reply: magic, error, cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: Structured reply chunk header: magic, flags, type, cookie, payload length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: Payload start of NBD_REPLY_TYPE_OFFSET_DATA.
OFFSET_DATA = struct.Struct(">Q")
#: Payload of NBD_REPLY_TYPE_OFFSET_HOLE: offset, hole size.
OFFSET_HOLE = struct.Struct(">QI")
#: Payload start of NBD_REPLY_TYPE_ERROR: error, message length.
ERROR_CHUNK = struct.Struct(">IH")
#: One base:allocation descriptor: length, status flags.
EXTENT = struct.Struct(">II")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

ZERO_PAD = bytes(124)


class ProtocolError(StandbyError):
    """The peer broke the protocol; the connection ends (requests on it cannot be told apart any more)."""

    template = "NBD protocol error: {detail}"


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """Pack one option reply with its data."""
    return OPTION_REPLY.pack(REP_MAGIC, option, reply, len(data)) + data


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, *, done: bool) -> bytes:
    """Header of one structured reply chunk whose payload is `length` bytes."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie, length)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    """A final NBD_REPLY_TYPE_ERROR chunk with a human-readable message."""
    text = message.encode("utf-8")[:4096]
    payload = ERROR_CHUNK.pack(error, len(text)) + text
    return chunk_header(cookie, REPLY_TYPE_ERROR, len(payload), done=True) + payload


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """A final NBD_REPLY_TYPE_BLOCK_STATUS chunk; `extents` are ``(length, flags)``."""
    payload = bytearray(U32.pack(context_id))
    for length, flags in extents:
        payload += EXTENT.pack(length, flags)
    return chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload), done=True) + bytes(payload)


def pack_string(text: str) -> bytes:
    """A 32-bit length followed by the UTF-8 text, as in option data."""
    data = text.encode("utf-8")
    return U32.pack(len(data)) + data


# -- client side ------------------------------------------------------------------------------------------

#: Second magic of the oldstyle handshake ("cliserv_magic"); a client recognises it to refuse it clearly.
OLDSTYLE_MAGIC: Final = 0x00420281861253
#: Bit 15 of a structured reply type: an error chunk (its payload starts like NBD_REPLY_TYPE_ERROR's).
REPLY_TYPE_FLAG_ERROR: Final = 1 << 15
