"""One unit for sizes everywhere: MB is 10^6 bytes (as Hugging Face and disk makers count), GB 10^9."""
from __future__ import annotations

MB = 1_000_000


def mb_from_bytes(n: int | float) -> int:
    return int(n // MB)


def readable_mb(mb: int | float | None) -> str:
    if not mb:
        return "—"
    return f"{mb / 1000:,.1f} GB" if mb >= 1000 else f"{mb:,.0f} MB"
