"""UUIDv7 ids (RFC 9562): time-ordered, so inserts append to the right edge of b-tree indexes."""

from __future__ import annotations

import os
import time
import uuid

# A UUID in its canonical 36-character text form (any version); anchor it where it is used.
UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

_last = 0


def uuid7() -> uuid.UUID:
    """Monotonic within this process (RFC 9562 6.2, method 2): ids made in the same
    millisecond still sort in creation order, so keyset pages and audit order hold."""
    global _last
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64 & (0xFFF << 64)  # rand_a: 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b: 62 bits
    if value <= _last:
        # Same millisecond (or the clock stepped back): one past the last id, keeping the
        # version and variant bits (rand_b carrying into rand_a would need 2^62 ids in 1 ms).
        value = _last + 1
    _last = value
    return uuid.UUID(int=value)


def parse_uuid(raw: str) -> uuid.UUID | None:
    """A canonical 36-character UUID string, else None (callers answer 404 or 422)."""
    if len(raw) != 36:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None
