"""Stable small numbers for names (identities, service ids, proxy and tunnel ports).

Derived by hashing, with deterministic probing on collision, so adding one object does not
renumber the others.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable


def alloc(names: Iterable[str], base: int, count: int) -> dict[str, int]:
    """Stable small numbers for names: crc32 slot, linear probing in sorted name order."""
    out: dict[str, int] = {}
    used: set[int] = set()
    for name in sorted(set(names)):
        n = zlib.crc32(name.encode()) % count
        for _ in range(count):
            if base + n not in used:
                break
            n = (n + 1) % count
        else:
            raise ValueError(f"allocate number for {name}: all {count} numbers in use")
        used.add(base + n)
        out[name] = base + n
    return out
