"""Price overrides: the ``PRICES_FILE`` entries that win over the bundled price table.

A JSON file (docs/prices.md) of ``{"prices": [entry, ...]}``, each entry a
model pattern, an optional provider, rates in US dollars per million tokens
and an optional ``valid_from`` date, for custom, fine-tuned and self-hosted
models (``0`` prices a local model at $0). :func:`load_overrides` validates
the whole file with pydantic; the settings call it at start, so a malformed
file stops the start with one line naming the entry. ``mlops.prices.Table``
matches the entries against each call.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Rate = Annotated[Decimal, Field(ge=0, le=1_000_000, allow_inf_nan=False)]


class PriceOverride(BaseModel):
    """One entry of ``PRICES_FILE``: rates in US dollars per million tokens.

    ``model`` is a glob (``*``, ``?``, ``[...]``, fnmatch rules), matched
    case-insensitively against the event's ``model_name``; ``provider``, when
    given, must equal the call's ``gen_ai.provider.name`` (or the genai-prices
    id it maps to). ``cache_read_per_mtok`` defaults to the input rate;
    ``valid_from`` (a UTC date) defaults to always.
    """

    model_config = ConfigDict(extra="forbid", strict=False)

    model: str = Field(min_length=1, max_length=128)
    provider: str | None = Field(default=None, min_length=1, max_length=128)
    input_per_mtok: Rate
    output_per_mtok: Rate
    cache_read_per_mtok: Rate | None = None
    request_per_k: Rate | None = None
    valid_from: date | None = None


class PricesFile(BaseModel):
    """The whole ``PRICES_FILE``: ``{"prices": [PriceOverride, ...]}``."""

    model_config = ConfigDict(extra="forbid")

    prices: list[PriceOverride] = Field(max_length=10_000)


class PricesFileError(ValueError):
    """``PRICES_FILE`` is unreadable or malformed; ``str(error)`` is one line naming the entry."""


def _entry_name(raw: object, index: int) -> str:
    model = raw.get("model") if isinstance(raw, dict) else None
    return f"entry {index + 1}" + (f" (model {model!r})" if isinstance(model, str) else "")


def load_overrides(path: Path) -> tuple[list[PriceOverride], str]:
    """The entries of the overrides file at ``path`` and the sha256 (hex) of its bytes.

    Raises :class:`PricesFileError` (one line: the file, the entry number
    and model, the field and what is wrong) for an unreadable file, bad
    JSON, an entry that fails validation, or two entries for the same
    model, provider and ``valid_from``.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PricesFileError(f"PRICES_FILE {path} cannot be read: {exc.strerror}") from None
    try:
        raw = json.loads(data, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PricesFileError(f"PRICES_FILE {path} is not valid JSON: {exc}") from None
    try:
        parsed = PricesFile.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = list(error["loc"])
        where = "file"
        if len(loc) >= 2 and loc[0] == "prices" and isinstance(loc[1], int):
            where = _entry_name(raw["prices"][loc[1]], loc[1])
            loc = loc[2:]
        field = ".".join(map(str, loc)) or "entry"
        raise PricesFileError(f"PRICES_FILE {path}: {where}: {field}: {error['msg']}") from None
    seen: dict[tuple, int] = {}
    for index, entry in enumerate(parsed.prices):
        key = (entry.model.lower(), (entry.provider or "").lower(), entry.valid_from)
        if key in seen:
            raise PricesFileError(
                f"PRICES_FILE {path}: {_entry_name(raw['prices'][index], index)}: same model, "
                f"provider and valid_from as entry {seen[key] + 1}")
        seen[key] = index
    return parsed.prices, hashlib.sha256(data).hexdigest()
