"""The configured keys and what each grants: scopes, businesses, an expiry (``MLOPS_KEYS_FILE``).

:class:`Keyring` holds every key (``MLOPS_API_KEY``, ``MLOPS_READ_API_KEY``
and the keys file's) with its :class:`Grant`; mlops/auth.py asks it.
:func:`auth_settings` reads and checks the keys, the auth mode and the
/metrics token from the values ``mlops.config`` read from the environment and
`.env` (this module reads no environment variable itself): a value, or the
file its ``_FILE`` names (Docker/Kubernetes secrets), or the keys file.

A keys file is TOML (read with the standard library's ``tomllib``), one
``[[key]]`` table per key::

    [[key]]
    name = "acme-dashboard"                 # optional: shown in /health/detailed, logs
    key_file = "/run/secrets/acme_read"     # or key = "..." (16+ characters)
    scopes = ["read"]                       # any of write, read, erase
    businesses = ["acme"]                   # every scope limited to these business ids
    expires_at = 2027-01-01T00:00:00Z       # optional; a TOML date-time with its offset

    [[key]]
    key_file = "partner.key"                # relative to the keys file's folder
    scopes = ["write", "read"]
    businesses = { write = ["partner-1"], read = ["partner-1", "partner-2"] }

``businesses`` left out: the key reaches every business in its scopes (as
``MLOPS_API_KEY`` does). Given per scope, every scope of the key must have
its list. docs/security.md ("Keys limited to businesses") says why TOML.

:func:`load_keys_file` raises :class:`KeysFileError` with one line naming the
entry (never the key); :func:`auth_settings`, called by ``mlops.config`` only,
raises ValueError with one line naming the variable or the entry.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from .schemas import Id

Scope = Literal["write", "read", "erase"]
SCOPES: tuple[str, ...] = ("write", "read", "erase")

# Entries in a keys file. Every request compares the key it carries with each
# configured key (Keyring), so this bounds that work.
MAX_KEYS = 1000
# Business ids one scope of one key may list (held as a frozenset: one lookup per check).
MAX_BUSINESSES = 10_000
# Characters: the shortest key (any of them) or /metrics token accepted. A
# key from ``secrets.token_urlsafe(32)`` has 43.
MIN_SECRET_CHARS = 16
MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024


class KeysFileError(ValueError):
    """The keys file is unreadable or an entry is malformed; ``str()`` is one line."""


@dataclass(frozen=True)
class Grant:
    """What one key may do: its scopes; per scope the business ids it is limited to
    (a scope missing from ``businesses`` reaches every business); until when (UTC)."""

    scopes: frozenset[str]
    businesses: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)
    expires_at: datetime | None = None
    name: str | None = None

    def limited_to(self, scope: str) -> frozenset[str] | None:
        """The business ids ``scope`` is limited to, or None: every business."""
        return self.businesses.get(scope)

    def expired(self, now: datetime) -> bool:
        """Whether ``now`` (timezone-aware) is at or past ``expires_at``."""
        return self.expires_at is not None and now >= self.expires_at

    def describe(self) -> dict:
        """JSON-ready ``{"name", "scopes", "businesses", "expires_at"}`` (no key):
        ``businesses`` maps each scope to its sorted list, or null for every business."""
        return {
            "name": self.name,
            "scopes": [s for s in SCOPES if s in self.scopes],
            "businesses": {s: (sorted(self.businesses[s]) if s in self.businesses else None)
                           for s in SCOPES if s in self.scopes},
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


@dataclass(frozen=True)
class KeySpec:
    """One configured key and its :class:`Grant`."""

    key: str = field(repr=False)
    grant: Grant


FULL_ACCESS = frozenset(SCOPES)
READ_ONLY = frozenset({"read"})
# What MLOPS_API_KEY and MLOPS_READ_API_KEY grant: every business, no expiry.
FULL_GRANT = Grant(FULL_ACCESS)
READ_GRANT = Grant(READ_ONLY)


class Keyring:
    """The configured keys and the :class:`Grant` of each, compared in constant time.

    Every key is held as its HMAC-SHA256 under a secret derived from all the
    configured keys (full, read and the keys file's). Comparisons are between
    32-byte values (``hmac.compare_digest``) and every key is compared on every
    call, so the time taken says nothing about which key, or how much of one,
    matched.

    The same HMAC names a key (:meth:`key_id`): its first 12 hex digits
    (48 bits). Keyed, so a log line or a rate-limit bucket name cannot be
    checked against guessed keys by anyone who does not hold every configured
    key; derived from the keys, so every worker, instance and restart with
    the same keys names a key the same way with nothing more to configure.
    Changing the set of keys (a rotation) renames every key from then on.
    """

    def __init__(self, full: Iterable[str], read: Iterable[str],
                 scoped: Iterable[KeySpec] = ()) -> None:
        full, read, scoped = list(full), list(read), list(scoped)
        keys = full + read + [spec.key for spec in scoped]
        material = "\n".join(sorted(keys)).encode()  # keys hold no newline
        self._secret = hashlib.sha256(b"mlops-service key id\0" + material).digest()
        sources = ([(k, FULL_GRANT, "MLOPS_API_KEY") for k in full]
                   + [(k, READ_GRANT, "MLOPS_READ_API_KEY") for k in read]
                   + [(spec.key, spec.grant, "MLOPS_KEYS_FILE") for spec in scoped])
        self._entries = [(self.digest(k), grant) for k, grant, _ in sources]
        # (key id, where the key is configured, its grant), for /health/detailed.
        self.listing = tuple((self.key_id(k), source, grant) for k, grant, source in sources)

    def digest(self, value: str) -> bytes:
        """HMAC-SHA256 of ``value`` under this keyring's secret (32 bytes)."""
        return hmac.new(self._secret, value.encode(), hashlib.sha256).digest()

    def key_id(self, key: str) -> str:
        """12 hex digits naming ``key`` (any string: a configured key or not)."""
        return self.digest(key).hex()[:12]

    def grant_for(self, given: str) -> Grant | None:
        """The :class:`Grant` of the key ``given``, or None (unknown key); expiry unchecked."""
        digest = self.digest(given)
        granted = None
        for expected, grant in self._entries:
            if hmac.compare_digest(digest, expected):
                granted = grant
        return granted

    def scopes_for(self, given: str) -> frozenset[str]:
        """The scopes ``given`` grants (none for an unknown key); expiry unchecked."""
        grant = self.grant_for(given)
        return grant.scopes if grant is not None else frozenset()


BusinessList = Annotated[list[Id], Field(min_length=1, max_length=MAX_BUSINESSES)]


class _Entry(BaseModel):
    """One ``[[key]]`` table, as written."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    key: str | None = Field(default=None, repr=False)
    key_file: str | None = None
    scopes: Annotated[list[Scope], Field(min_length=1)]
    businesses: BusinessList | dict[Scope, BusinessList] | None = None
    expires_at: AwareDatetime | None = None


def _problem(exc: ValidationError) -> str:
    """The most specific error of ``exc`` as ``field: message`` (never the input itself).

    Of a union's alternatives (``businesses``: a list, or a table per scope)
    the error reaching deepest names the field best; pydantic's own names of
    the alternatives (``list[...]``) are left out of the field's path.
    """
    errors = exc.errors(include_input=False, include_url=False)
    error = max(errors, key=lambda e: len(e["loc"]))
    where = ".".join(str(p) for p in error["loc"] if "[" not in str(p)) or "entry"
    return f"{where}: {error['msg']}"


def _read_key(entry: _Entry, folder: Path) -> str:
    if (entry.key is None) == (entry.key_file is None):
        raise ValueError("give key or key_file (one of them)")
    if entry.key is not None:
        return entry.key.strip()
    path = folder / entry.key_file
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except OSError as exc:
        raise ValueError(f"key_file {entry.key_file!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"key_file {entry.key_file!r} is not UTF-8 text") from None


def _grant(entry: _Entry) -> Grant:
    scopes = frozenset(entry.scopes)
    if isinstance(entry.businesses, dict):
        if missing := [s for s in SCOPES if s in scopes and s not in entry.businesses]:
            raise ValueError(f"businesses names no list for scope {missing[0]!r} "
                             "(give one per scope, or one list for all)")
        if extra := [s for s in entry.businesses if s not in scopes]:
            raise ValueError(f"businesses lists scope {extra[0]!r}, which is not in scopes")
        limits = {s: frozenset(ids) for s, ids in entry.businesses.items()}
    elif entry.businesses is not None:
        limits = {s: frozenset(entry.businesses) for s in scopes}
    else:
        limits = {}
    return Grant(scopes, MappingProxyType(limits), entry.expires_at, entry.name)


def parse_keys(text: str, folder: Path) -> tuple[KeySpec, ...]:
    """The keys of a keys file's ``text``; ``key_file`` paths are relative to ``folder``.

    Raises :class:`KeysFileError`: ``key N (name): field: problem``, one line.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"is not valid TOML: {exc}") from None
    if unknown := sorted(set(document) - {"key"}):
        raise KeysFileError(f"has {unknown[0]!r} at the top level; write each key as [[key]]")
    tables = document.get("key", [])
    if not isinstance(tables, list) or not tables:
        raise KeysFileError("holds no [[key]] table")
    if len(tables) > MAX_KEYS:
        raise KeysFileError(f"holds {len(tables)} keys, more than {MAX_KEYS}")
    specs, seen = [], set()
    for number, table in enumerate(tables, start=1):
        if not isinstance(table, dict):
            raise KeysFileError(f"key {number}: is not a table; write each key as [[key]]")
        name = table.get("name")
        label = f"key {number}" + (f" ({name})" if isinstance(name, str) and name else "")
        try:
            entry = _Entry.model_validate(table)
            key = _read_key(entry, folder)
            if len(key) < MIN_SECRET_CHARS:
                raise ValueError(f"the key must be at least {MIN_SECRET_CHARS} characters "
                                 f"(it has {len(key)})")
            if "\n" in key:
                raise ValueError("the key must not hold a line break")
            if key in seen:
                raise ValueError("the key is given again (each key once)")
            seen.add(key)
            specs.append(KeySpec(key, _grant(entry)))
        except ValidationError as exc:
            raise KeysFileError(f"{label}: {_problem(exc)}") from None
        except ValueError as exc:
            raise KeysFileError(f"{label}: {exc}") from None
    return tuple(specs)


def load_keys_file(path: Path) -> tuple[KeySpec, ...]:
    """Read and parse the keys file at ``path`` (at most ``MAX_KEYS_FILE_BYTES``, UTF-8,
    a byte order mark dropped). Raises :class:`KeysFileError`."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_KEYS_FILE_BYTES + 1)
    except OSError as exc:
        raise KeysFileError(f"cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_KEYS_FILE_BYTES:
        raise KeysFileError(f"is larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise KeysFileError("is not UTF-8 text") from None
    return parse_keys(text, path.parent)


def auth_settings(values: Mapping[str, object]) -> dict[str, object]:
    """The auth settings from ``values``, the settings as read (variable name -> value).

    Returns ``{"MLOPS_API_KEY": (key, ...), "MLOPS_READ_API_KEY": (key, ...),
    "MLOPS_KEYS_FILE": (KeySpec, ...), "MLOPS_AUTH_MODE": "enforce" | "warn" | "off",
    "MLOPS_METRICS_TOKEN": str | None}``. Each key and the token comes from its
    variable or the file named by its ``_FILE``; each is ``MIN_SECRET_CHARS``
    characters at least. The mode is ``off`` without keys, else
    ``MLOPS_AUTH_MODE`` (``enforce`` by default, or ``warn``).

    Raises ValueError: one line naming the variable or the keys file's entry,
    never a key.
    """
    full = _keys(values, "MLOPS_API_KEY")
    read = _keys(values, "MLOPS_READ_API_KEY")
    scoped = _scoped_keys(values)
    writers = full or any("write" in spec.grant.scopes for spec in scoped)
    if read and not writers:
        raise ValueError("MLOPS_READ_API_KEY needs MLOPS_API_KEY too (no key could write)")
    if set(full) & set(read):
        raise ValueError("a key is in both MLOPS_API_KEY and MLOPS_READ_API_KEY")
    if {spec.key for spec in scoped} & (set(full) | set(read)):
        raise ValueError("a key of MLOPS_KEYS_FILE is also in MLOPS_API_KEY or "
                         "MLOPS_READ_API_KEY (give each key once)")
    mode = str(values.get("MLOPS_AUTH_MODE", "enforce")).lower()
    if mode not in {"enforce", "warn"}:
        raise ValueError(f"MLOPS_AUTH_MODE must be enforce or warn, got {mode!r}")
    if not full and not scoped:
        if "MLOPS_AUTH_MODE" in values:
            raise ValueError("MLOPS_AUTH_MODE needs MLOPS_API_KEY (without a key nothing "
                             "is checked)")
        mode = "off"
    token = _secret(values, "MLOPS_METRICS_TOKEN")
    if token is not None:
        _long_enough("MLOPS_METRICS_TOKEN", (token,))
    return {"MLOPS_API_KEY": full, "MLOPS_READ_API_KEY": read, "MLOPS_KEYS_FILE": scoped,
            "MLOPS_AUTH_MODE": mode, "MLOPS_METRICS_TOKEN": token}


def _secret(values: Mapping[str, object], name: str) -> str | None:
    """``name``, or the contents of the file named by ``name_FILE`` (Docker/Kubernetes secrets).

    Surrounding whitespace is dropped, and a file's UTF-8 byte order mark
    (``utf-8-sig``), so a key saved by an editor that adds one still matches.
    """
    key_file = values.get(f"{name}_FILE")
    if key_file:
        if name in values:
            raise ValueError(f"set {name} or {name}_FILE, not both")
        try:
            value = Path(key_file).read_text(encoding="utf-8-sig").strip()
        except OSError as exc:
            raise ValueError(f"{name}_FILE cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{name}_FILE is not UTF-8 text") from None
        if not value:
            raise ValueError(f"{name}_FILE names an empty file")
        return value
    value = str(values.get(name) or "").strip()
    return value or None


def _keys(values: Mapping[str, object], name: str) -> tuple[str, ...]:
    """The keys in ``name`` (or its ``_FILE``): separated by commas or newlines, trimmed,
    each at least ``MIN_SECRET_CHARS`` long."""
    raw = values.get(name)
    if isinstance(raw, tuple):  # already read (settings built from keyword arguments)
        return raw
    raw = _secret(values, name) or ""
    keys = tuple(k.strip() for k in raw.replace("\n", ",").split(","))
    if raw and not all(keys):
        raise ValueError(f"{name} holds an empty key (check the commas)")
    keys = tuple(k for k in keys if k)
    _long_enough(name, keys)
    return keys


def _scoped_keys(values: Mapping[str, object]) -> tuple[KeySpec, ...]:
    """The keys of ``MLOPS_KEYS_FILE`` (TOML; the format is at the top of this module), or ()."""
    path = values.get("MLOPS_KEYS_FILE")
    if isinstance(path, tuple):  # already read (settings built from keyword arguments)
        return path
    if not path:
        return ()
    try:
        return load_keys_file(Path(str(path)))
    except KeysFileError as exc:
        raise ValueError(f"MLOPS_KEYS_FILE {exc}") from None


def _long_enough(name: str, secrets: tuple[str, ...]) -> None:
    """ValueError naming ``name`` and the rule if a secret is short (never the secret)."""
    for position, secret in enumerate(secrets, start=1):
        if len(secret) < MIN_SECRET_CHARS:
            which = f"key {position} of {len(secrets)}" if len(secrets) > 1 else "it"
            raise ValueError(
                f"{name} must be at least {MIN_SECRET_CHARS} characters ({which} has "
                f"{len(secret)}); make one with: python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'")
