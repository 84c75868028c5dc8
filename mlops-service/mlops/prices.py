"""What a model call cost, from a price table: the bundled ``genai-prices`` data and overrides.

``genai-prices`` (PyPI, MIT, by the pydantic team) ships its price data
inside the wheel: per provider and model, USD per million input, output and
cached-input tokens, by date (a price change is a new entry with a start
date), with tiers for long prompts. This module reads that data only; it
never calls the package's update functions, so pricing needs no network.

Overrides (``PRICES_FILE``, mlops/price_overrides.py, docs/prices.md) name a model
pattern, an optional provider, per-million rates and an optional
``valid_from`` date; they win over the bundled table. A call no table knows
is ``unpriced`` (no price, never $0); a call with only a total token count
is priced as if every token were input and marked ``estimated``.

:class:`Table` looks each (provider, model, UTC day) up once and keeps the
resulting rates (:class:`mlops.price_rates.Rates`) in a bounded LRU cache, so
pricing an event costs a few integer multiplications (in picodollars,
:class:`Price`). The process-wide table (:func:`current`) is set by the app
factory from the settings (:func:`configure`); rows get their price from it
where records become rows (``mlops.schemas.Record``), so events delivered
later from the spool are priced by the same table.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import genai_prices
from genai_prices import data_snapshot, types

from .price_overrides import PriceOverride, load_overrides
from .price_rates import Rates

PRICED = "priced"
ESTIMATED = "estimated"
UNPRICED = "unpriced"

# Keys of an event's extra fields read for pricing (OpenTelemetry GenAI semantic
# conventions v1.37.0 attribute names).
PROVIDER_KEY = "gen_ai.provider.name"
CACHE_READ_KEY = "gen_ai.usage.cache_read.input_tokens"

# gen_ai.provider.name well-known values whose genai-prices provider id differs.
# Values not listed are passed as they are (openai, anthropic, cohere, deepseek,
# groq, perplexity ... are the same in both).
SEMCONV_PROVIDERS = {
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "aws.bedrock": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
}

# Distinct (provider, model, day) rate lookups kept per process. Model names come
# from clients, so the cache is bounded; a miss costs one table lookup (~40 µs).
CACHE_SIZE = 4096
# Lookups after which the genai-prices lookup object is rebuilt: it caches every
# model name it was asked about, misses included, without a bound.
SNAPSHOT_LOOKUPS = 10_000



class Price(NamedTuple):
    """A call's price: ``picodollars`` (an int, None when unpriced) and ``status``.

    A picodollar is 1e-12 US dollar, the scale of ``mlops_events.price_usd``
    (``numeric(24, 12)``): whole picodollars are exactly what the column
    stores, and an int costs far less to compute than a ``Decimal``.
    ``status`` is ``priced``, ``estimated`` (only a total token count was
    given), ``unpriced`` (no table knows the model), or None when pricing is
    off (``PRICES_ENABLED=false``: the row awaits ``make reprice``).
    """

    picodollars: int | None
    status: str | None

    @property
    def cost_usd(self) -> Decimal | None:
        """The price in US dollars (``picodollars`` scaled by 1e-12), or None."""
        return None if self.picodollars is None else Decimal(self.picodollars).scaleb(-12)


_NOT_PRICED = Price(None, None)
# Price(...) without NamedTuple's Python-level __new__ (the per-event path).
_new_price = tuple.__new__
_UNPRICED = Price(None, UNPRICED)


def _override_rates(entry: PriceOverride) -> Rates:
    return Rates(entry.input_per_mtok, entry.output_per_mtok,
                 entry.cache_read_per_mtok if entry.cache_read_per_mtok is not None
                 else entry.input_per_mtok,
                 entry.request_per_k, f"override {entry.model}")


class _TimeOfDay(NamedTuple):
    """A table model whose price depends on the time of day (off-peak rates)."""

    model: types.ModelInfo
    source: str


# --- the table ------------------------------------------------------------------

class Table:
    """A price table: ``overrides`` (``PRICES_FILE`` entries) over the bundled genai-prices data.

    ``version`` names it: ``genai-prices-<version>``, plus
    ``+overrides-<first 12 hex of the file's sha256>`` with an overrides file.
    ``enabled=False`` prices nothing (``Price(None, None)``).
    """

    def __init__(self, overrides: list[PriceOverride] = (), overrides_sha256: str | None = None,
                 *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.version = f"genai-prices-{genai_prices.__version__}" + (
            f"+overrides-{overrides_sha256[:12]}" if overrides_sha256 else "")
        self._overrides = [(re.compile(fnmatch.translate(e.model.lower())), e) for e in overrides]
        self._snapshot = self._new_snapshot()
        self._lookups = 0
        self.rates = functools.lru_cache(maxsize=CACHE_SIZE)(self._lookup)

    @classmethod
    def from_file(cls, path: Path | None, *, enabled: bool = True) -> Table:
        """The table with the overrides of ``path`` (None: the bundled data only).

        Raises :class:`mlops.price_overrides.PricesFileError`.
        """
        if path is None:
            return cls(enabled=enabled)
        return cls(*load_overrides(path), enabled=enabled)

    @staticmethod
    def _new_snapshot() -> data_snapshot.DataSnapshot:
        return data_snapshot.DataSnapshot(
            providers=data_snapshot.get_snapshot().providers, from_auto_update=False)

    def _lookup(self, provider: str | None, model: str, day: date) -> Rates | _TimeOfDay | None:
        """The rates for ``model`` on ``day`` (uncached); None when no table knows it."""
        name = model.lower()
        provider_id = SEMCONV_PROVIDERS.get(provider, provider) if provider else None
        best = None
        for pattern, entry in self._overrides:
            if (pattern.match(name)
                    and (entry.provider is None
                         or entry.provider.lower() in (provider, provider_id))
                    and (entry.valid_from is None or entry.valid_from <= day)
                    and (best is None or (entry.valid_from or date.min)
                         > (best.valid_from or date.min))):
                best = entry
        if best is not None:
            return _override_rates(best)
        self._lookups += 1
        if self._lookups > SNAPSHOT_LOOKUPS:
            self._snapshot, self._lookups = self._new_snapshot(), 0
        found = None
        for candidate in dict.fromkeys((provider_id, None)):
            try:
                found = self._snapshot.find_provider_model(name, None, candidate, None)
                break
            except LookupError:
                continue
        if found is None:
            return None
        table_provider, info = found
        source = f"genai-prices {table_provider.id}/{info.id}"
        if isinstance(info.prices, list) and any(
                isinstance(c.constraint, types.TimeOfDateConstraint) for c in info.prices):
            return _TimeOfDay(info, source)
        return Rates.from_model_price(
            info.get_prices(datetime.combine(day, time(), UTC)), source)

    def price(self, model: str, at: datetime, *, provider: str | None = None,
              input_tokens: int | None, output_tokens: int | None, total_tokens: int,
              cache_read_tokens: int | None = None) -> Price:
        """The price of one call of ``model`` at ``at`` (an aware datetime).

        ``provider`` is a ``gen_ai.provider.name`` or genai-prices provider id
        (None: inferred from the model name; a provider that does not list
        the model is ignored the same way). With both ``input_tokens`` and
        ``output_tokens`` the call is ``priced``; otherwise ``total_tokens``
        are priced at the input rate and the call is ``estimated``.
        ``cache_read_tokens`` (part of the input) is clamped to the input.
        """
        if not self.enabled:
            return _NOT_PRICED
        return self._price(model, at, provider, input_tokens, output_tokens, total_tokens,
                           cache_read_tokens)

    def _price(self, model, at, provider, input_tokens, output_tokens, total_tokens,
               cache_read_tokens) -> Price:
        """:meth:`price` with positional arguments (the per-event path)."""
        day = at.date() if at.tzinfo is UTC else at.astimezone(UTC).date()
        return _charge(self.rates(provider, model, day), at, input_tokens, output_tokens,
                       total_tokens, cache_read_tokens)

    def price_events(self, events: Sequence, times: Sequence[datetime]) -> list[Price]:
        """:meth:`price_event` of each ``MetricsEvent`` at its time, in order: the same
        prices, with each distinct time's UTC day and each (provider, model, day)'s
        rates looked up once per call rather than once per event."""
        if not self.enabled:
            return [_NOT_PRICED] * len(events)
        days: dict[datetime, date] = {}
        rates_of: dict[tuple, Rates | _TimeOfDay | None] = {}
        prices = []
        for event, at in zip(events, times, strict=True):
            provider = cache_read_tokens = None
            extra = event.model_extra
            if extra:
                provider, cache_read_tokens = _extra_inputs(extra)
            day = days.get(at)
            if day is None:
                day = days[at] = at.date() if at.tzinfo is UTC else at.astimezone(UTC).date()
            key = (provider, event.model_name, day)
            try:
                rates = rates_of[key]
            except KeyError:
                rates = rates_of[key] = self.rates(*key)
            prices.append(_charge(rates, at, event.prompt_tokens, event.completion_tokens,
                                  event.tokens_used, cache_read_tokens))
        return prices

    def price_event(self, event, received_at: datetime) -> Price:
        """The price of a ``MetricsEvent`` received at ``received_at`` (its call's time).

        Reads ``model_name``, ``prompt_tokens``, ``completion_tokens``,
        ``tokens_used`` and, from the extra fields, ``gen_ai.provider.name``
        and ``gen_ai.usage.cache_read.input_tokens`` (see :meth:`price_stored`).
        """
        return self.price_events([event], [received_at])[0]

    def price_stored(self, model: str, at: datetime, prompt_tokens: int | None,
                     completion_tokens: int | None, tokens_used: int, provider: object = None,
                     cache_read_tokens: object = None) -> Price:
        """:meth:`price` from an event's stored values; ``provider`` and
        ``cache_read_tokens`` are its extra fields' values as parsed from JSON,
        used when they are a string and a whole number >= 0 (else ignored)."""
        if not self.enabled:
            return _NOT_PRICED
        provider, cache_read_tokens = _valid_inputs(provider, cache_read_tokens)
        return self._price(model, at, provider, prompt_tokens, completion_tokens, tokens_used,
                           cache_read_tokens)


def _extra_inputs(extra: dict) -> tuple[str | None, int | None]:
    """The provider and cached-input token count among an event's extra fields
    (see :func:`_valid_inputs`)."""
    return _valid_inputs(extra.get(PROVIDER_KEY), extra.get(CACHE_READ_KEY))


def _valid_inputs(provider: object, cache_read_tokens: object) -> tuple[str | None, int | None]:
    """``provider`` and ``cache_read_tokens`` as parsed from JSON, each None unless a
    string and a whole number >= 0."""
    if type(provider) is not str:
        provider = None
    if type(cache_read_tokens) is not int or cache_read_tokens < 0:
        cache_read_tokens = None
    return provider, cache_read_tokens


def _charge(rates: Rates | _TimeOfDay | None, at: datetime, input_tokens: int | None,
            output_tokens: int | None, total_tokens: int, cache_read_tokens: int | None) -> Price:
    """The price of one call at ``rates`` (None: unpriced); see :meth:`Table.price`."""
    if rates is None:
        return _UNPRICED
    if type(rates) is _TimeOfDay:
        rates = Rates.from_model_price(rates.model.get_prices(at), rates.source)
    if input_tokens is None or output_tokens is None:
        input_tokens, output_tokens, cache_read_tokens, status = total_tokens, 0, 0, ESTIMATED
    else:
        cache_read_tokens = min(cache_read_tokens, input_tokens) if cache_read_tokens else 0
        status = PRICED
    fast = rates._fast  # Rates.picodollars's integer path, inlined (the per-event path)
    if fast is not None and input_tokens <= fast[0]:
        _, rate_in, rate_out, rate_cached, per_request = fast
        return _new_price(Price, (rate_in * (input_tokens - cache_read_tokens)
                                  + rate_cached * cache_read_tokens
                                  + rate_out * output_tokens + per_request, status))
    return _new_price(Price, (rates.picodollars(input_tokens, output_tokens, cache_read_tokens),
                              status))


_current = Table()


def configure(table: Table) -> None:
    """Make ``table`` the one this process prices with (the app factory calls it)."""
    global _current
    _current = table


def current() -> Table:
    """The table this process prices with (the bundled data until :func:`configure`)."""
    return _current
