"""NBD reply parts: what a READ reply or an error reply is made of, cut per request, and sent.

A reply is a list of parts: bytes-like objects, sent gathered with ``sendmsg``, and file ranges, sent
by reference with ``sendfile``. READ data arrives as segments: parts, or holes given as an int length
(hole chunks in structured replies, zeros in simple ones).
"""

from __future__ import annotations

import struct

from standbylib.nbd import protocol as p
from standbylib.nbd.sockio import SocketWriter, zero_parts
from standbylib.rawfile import Buffer
from standbylib.readplan import Bytes, FileRange

#: A part of a reply: bytes to send, or a file range to send by reference.
Part = Buffer | FileRange
#: A segment of READ data: a part, or a hole of that many bytes.
Segment = Part | int

_HEADER = p.STRUCTURED_REPLY
# A whole one-chunk OFFSET_DATA reply header: chunk header and the data's offset.
_DATA_CHUNK = struct.Struct(">IHHQIQ")
_DATA_START = (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA)


def data_header(cookie: int, offset: int, length: int) -> bytes:
    """Header of a structured READ reply that is one final OFFSET_DATA chunk of `length` bytes."""
    return _DATA_CHUNK.pack(*_DATA_START, cookie, 8 + length, offset)


def read_reply(
    cookie: int, offset: int, segments: list[Segment], *, structured: bool, one_chunk: bool = False
) -> list[Part]:
    """The parts of a successful READ reply carrying `segments` from `offset`; with `one_chunk`
    (NBD_CMD_FLAG_DF) a structured reply is a single OFFSET_DATA chunk, holes sent as zeros."""
    if len(segments) == 1 and not isinstance(segments[0], int):
        # The common case, one piece of data: one header.
        data = segments[0]
        if not structured:
            return [p.simple_reply(cookie), data]
        return [data_header(cookie, offset, length_of(data)), data]
    out: list[Part] = []
    if not structured or one_chunk:
        total = sum(length_of(seg) for seg in segments)
        out.append(data_header(cookie, offset, total) if structured else p.simple_reply(cookie))
        for seg in segments:
            if isinstance(seg, int):
                out.extend(zero_parts(seg))
            else:
                out.append(seg)
        return out
    # Structured: one OFFSET_DATA chunk per run of data, one OFFSET_HOLE chunk per hole.
    pos = offset
    i, n = 0, len(segments)
    while i < n:
        seg = segments[i]
        if isinstance(seg, int):
            i += 1
            out.append(
                _HEADER.pack(
                    p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if i == n else 0,
                    p.REPLY_TYPE_OFFSET_HOLE, cookie, p.OFFSET_HOLE.size,
                )
                + p.OFFSET_HOLE.pack(pos, seg)
            )  # fmt: skip
            pos += seg
            continue
        j = i
        size = 0
        while j < n and not isinstance(segments[j], int):
            size += length_of(segments[j])
            j += 1
        out.append(
            _HEADER.pack(
                p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if j == n else 0,
                p.REPLY_TYPE_OFFSET_DATA, cookie, 8 + size,
            )
            + p.OFFSET_DATA.pack(pos)
        )  # fmt: skip
        out.extend(seg for seg in segments[i:j] if not isinstance(seg, int))
        pos += size
        i = j
    return out


def error_reply(cookie: int, error: int, message: str, *, structured: bool) -> list[Part]:
    if structured:
        return [p.error_chunk(cookie, error, message)]
    return [p.simple_reply(cookie, error)]


def send_parts(writer: SocketWriter, parts: list[Part]) -> None:
    """Send `parts` in order, the caller holding ``writer.lock``: gathered ``sendmsg`` calls, with
    ``sendfile`` for file ranges."""
    iov: list[Buffer] = []
    for item in parts:
        if isinstance(item, FileRange):
            if iov:
                writer.send_locked(iov, more=True)
                iov = []
            writer.sendfile_locked(item)
        else:
            iov.append(item)
    if iov:
        writer.send_locked(iov)


def length_of(item: Segment) -> int:
    if isinstance(item, int):
        return item
    if isinstance(item, FileRange):
        return item.length
    return len(item)


def as_segment(piece: FileRange | Bytes) -> Segment:
    return piece if isinstance(piece, FileRange) else piece.data


def take(segments: list[Segment], k: int, cut: int, n: int) -> tuple[list[Segment], int, int]:
    """The next `n` bytes of `segments`, starting `cut` bytes into ``segments[k]``; and where the
    bytes after them start."""
    out: list[Segment] = []
    while n:
        seg = segments[k]
        left = length_of(seg) - cut
        size = min(left, n)
        if cut == 0 and size == left:
            out.append(seg)
        elif isinstance(seg, int):
            out.append(size)
        elif isinstance(seg, FileRange):
            out.append(FileRange(seg.fd, seg.offset + cut, size))
        else:
            out.append(memoryview(seg)[cut : cut + size])
        n -= size
        if size == left:
            k, cut = k + 1, 0
        else:
            cut += size
    return out, k, cut
