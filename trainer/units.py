"""Byte units and the one way the trainer prints a number of bytes."""

KiB = 2**10
MiB = 2**20
GiB = 2**30


def format_bytes(n, sep=" "):
    """'1.90 GiB', '712.1 MiB', '3.0 KiB', '12 B' (binary units, as nvidia-smi and torch count); sep="" gives
    the progress line's compact '712.1MiB'."""
    for unit, size, digits in (("GiB", GiB, 2), ("MiB", MiB, 1), ("KiB", KiB, 1)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f}{sep}{unit}"
    return f"{int(n)}{sep}B"
