"""WAL positions (LSNs).

PostgreSQL prints an LSN as two hexadecimal halves, ``16/B374D848``; it is a 64-bit byte
position in the write-ahead log, so subtracting two gives a distance in bytes.
"""

from __future__ import annotations

import re

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


class LSN(int):
    """A WAL position: an ``int`` (bytes) that prints the way PostgreSQL does."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str | bytes) -> LSN:
        """Parse PostgreSQL's ``hi/lo`` text form (as returned by ``pg_lsn`` columns)."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        match = _LSN_RE.match(text.strip())
        if match is None:
            raise ValueError(f"not an LSN: {text!r}")
        return cls((int(match.group(1), 16) << 32) | int(match.group(2), 16))

    def __str__(self) -> str:
        return f"{int(self) >> 32:X}/{int(self) & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"LSN('{self}')"


ZERO = LSN(0)


def from_column(raw: bytes) -> LSN:
    """A ``pg_lsn`` column's text as the server prints it (``hi/lo`` in hex) as an LSN:
    :meth:`LSN.parse` without its checks, which text from elsewhere needs (a third of the
    bytecodes; a read's and a write's results are parsed on their hot path)."""
    high, _, low = raw.partition(b"/")
    return LSN((int(high, 16) << 32) | int(low, 16))


__all__ = ["LSN", "ZERO", "from_column"]
