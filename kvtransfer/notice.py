"""The typed messages a prefill worker sends a decode worker about one reservation.

A notice names a request id and the epoch of its reservation on the decode worker, and says one of:

* ``DATA``: every block of the request's cache has landed (it rides on the last write, so the
  receiver sees it only after those bytes are in its pools);
* ``RELEASED``: the prefill side will write nothing more into that reservation (it finished at
  its first token, was aborted, or failed) and every write it issued has settled.

Wire form (versioned; a receiver drops what it cannot parse, never guesses):
``b"SSN" | version u8 | kind u8 | epoch u64 | request id (utf-8, the rest)``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

NOTICE_VERSION = 1
_MAGIC = b"SSN"
_HEAD = struct.Struct("!3sBBQ")


class NoticeKind(enum.IntEnum):
    DATA = 1
    RELEASED = 2


class BadNotice(ValueError):
    """Bytes that are not a notice of a version this side understands."""


@dataclass(frozen=True, slots=True)
class Notice:
    kind: NoticeKind
    request_id: str
    epoch: int
    version: int = NOTICE_VERSION

    def to_bytes(self) -> bytes:
        return _HEAD.pack(_MAGIC, self.version, int(self.kind), self.epoch) + self.request_id.encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Notice:
        if len(data) <= _HEAD.size:
            raise BadNotice(f"{len(data)} bytes: too short for a notice")
        magic, version, kind, epoch = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise BadNotice(f"not a notice (magic {magic!r})")
        if version != NOTICE_VERSION:
            raise BadNotice(f"notice version {version}; this side speaks {NOTICE_VERSION}")
        try:
            return cls(NoticeKind(kind), data[_HEAD.size :].decode(), epoch, version)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadNotice(f"malformed notice: {e}") from e
