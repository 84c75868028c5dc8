"""The value types of settings, read as the environment writes them.

Each is a pydantic ``Annotated`` type for a field of ``mlops.config.Settings``.
A value that does not parse raises ValueError, ``must be ..., got '...'``,
which ``mlops.config`` prefixes with the variable's name. This module reads
no environment: ``mlops.config`` does, and validates what it read with these.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, ByteSize, TypeAdapter, ValidationError


def _whole(value):
    """A whole number as ``int()`` reads one (``"12"``, ``" 12 "``, ``"1_000"``)."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"must be a whole number, got {value!r}") from None
    return value


def _number(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
    return value


def _flag(value):
    """true/false, 1/0, yes/no in any case, spaces around ignored (as ``int()`` ignores them)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in {"1", "true", "yes"}:
            return True
        if word in {"0", "false", "no"}:
            return False
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _bytes(value) -> int | None:
    """A size in bytes with an optional unit, or None when unset.

    Parsed by pydantic's ``ByteSize``: ``500MB`` and ``0.5GB`` are powers of
    1000 (500,000,000 bytes), ``512MiB`` powers of 1024 (536,870,912 bytes);
    a bare number is bytes. At least 1 MiB.
    """
    if value is None:
        return None
    try:
        size = int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError:
        raise ValueError(f"must be a size such as 0.5GB, 512MiB or 500000000 (bytes), "
                         f"got {value!r}") from None
    if size < 1 << 20:
        raise ValueError(f"must be at least 1MiB, got {value!r}")
    return size


# A whole number: 12, " 12 ", 1_000.
Whole = Annotated[int, BeforeValidator(_whole)]
# A whole number of seconds, held as a float.
WholeSeconds = Annotated[float, BeforeValidator(_whole)]
# A number: 0.5, 2, 1e3.
Number = Annotated[float, BeforeValidator(_number)]
# true/false, 1/0, yes/no (any case).
Flag = Annotated[bool, BeforeValidator(_flag)]
# A size in bytes, 1 MiB at least: 0.5GB, 512MiB, 500000000; unset: None.
Bytes = Annotated[int | None, BeforeValidator(_bytes)]
# A rate limit in the ``limits`` notation: 100/second, 1000 per minute, 10/second;300/minute.
RateLimit = str
