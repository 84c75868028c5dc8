"""The rates of one model on one day, and what a call costs at them.

:class:`Rates` holds USD per million input, output and cached-input tokens
(flat, or tiered by the prompt's length as genai-prices' ``TieredPrices``)
and USD per thousand requests; :meth:`Rates.cost` is the exact ``Decimal``
cost of a call, :meth:`Rates.picodollars` the same in whole picodollars
(10^-12 USD), integer arithmetic below the first tier. ``mlops.prices``
builds them from genai-prices' data or an override and caches them.
"""

from __future__ import annotations

import dataclasses
from decimal import ROUND_HALF_UP, Decimal

from genai_prices import types

_ONE = Decimal(1)
_MILLION = Decimal(1_000_000)
_THOUSAND = Decimal(1000)

# A rate, flat or tiered as (base, ((start, rate), ...) highest start first)
# (genai-prices' TieredPrices: crossing a tier's start, counted in input
# tokens, applies its rate to every token of the call).
_Tiered = tuple[Decimal, tuple[tuple[int, Decimal], ...]]
# USD in picodollars (1e-12 USD, the scale of mlops_events.price_usd).
_PICO = 10**12


def _rate(price, input_tokens: int):
    """The rate ``price`` (flat or tiered, Decimal or int) charges a call of ``input_tokens``."""
    if type(price) is not tuple:
        return price
    base, tiers = price
    for start, rate in tiers:
        if input_tokens > start:
            return rate
    return base


def _from_table(price: Decimal | types.TieredPrices | None) -> Decimal | _Tiered | None:
    if isinstance(price, types.TieredPrices):
        return price.base, tuple(sorted(((t.start, t.price) for t in price.tiers), reverse=True))
    return price


def _in_pico(price: Decimal | None, per: int) -> int | None:
    """``price`` (USD per ``per`` units) in whole picodollars per unit; None if not whole."""
    if price is None:
        return 0
    value = price * _PICO / per
    return int(value) if value == value.to_integral_value() else None


def _base(price):
    return price[0] if type(price) is tuple else price


@dataclasses.dataclass(frozen=True)
class Rates:
    """What one model costs on one day: USD per million input, output and cached-input
    tokens, USD per thousand requests; ``source`` says which table gave them."""

    input: Decimal | _Tiered
    output: Decimal | _Tiered | None
    cache_read: Decimal | _Tiered | None
    requests: Decimal | None
    source: str

    def __post_init__(self) -> None:
        # Below the first tier's start, the base rates in whole picodollars per
        # token (per request), when each is a whole number of them (the table's
        # are): integer arithmetic for the common call, as exact as Decimal's.
        tiered = [p for p in (self.input, self.output, self.cache_read) if type(p) is tuple]
        below = min((start for _, tiers in tiered for start, _ in tiers), default=2**63)
        cached = self.cache_read if self.cache_read is not None else self.input
        fast = (_in_pico(_base(self.input), 10**6), _in_pico(_base(self.output), 10**6),
                _in_pico(_base(cached), 10**6), _in_pico(self.requests, 1000))
        object.__setattr__(self, "_fast", (below, *fast) if None not in fast else None)

    def cost(self, input_tokens: int, output_tokens: int, cache_read_tokens: int) -> Decimal:
        """USD of one call; ``input_tokens`` includes ``cache_read_tokens`` (genai-prices'
        rule: cached tokens are billed at the cache rate, or the input rate without one)."""
        total = Decimal(0)
        uncached = input_tokens
        if cache_read_tokens and self.cache_read is not None:
            total = _rate(self.cache_read, input_tokens) * cache_read_tokens
            uncached -= cache_read_tokens
        total += _rate(self.input, input_tokens) * uncached
        if output_tokens and self.output is not None:
            total += _rate(self.output, input_tokens) * output_tokens
        total /= _MILLION
        if self.requests is not None:
            total += self.requests / _THOUSAND
        return total

    def picodollars(self, input_tokens: int, output_tokens: int, cache_read_tokens: int) -> int:
        """:meth:`cost` in whole picodollars (1e-12 USD), rounded half away from zero
        as ``numeric(24, 12)`` rounds; integer arithmetic for the common call."""
        fast = self._fast
        if fast is not None and input_tokens <= fast[0]:
            _, rate_in, rate_out, rate_cached, per_request = fast
            return (rate_in * (input_tokens - cache_read_tokens) + rate_cached * cache_read_tokens
                    + rate_out * output_tokens + per_request)
        cost = self.cost(input_tokens, output_tokens, cache_read_tokens)
        return int(cost.scaleb(12).quantize(_ONE, rounding=ROUND_HALF_UP))

    @classmethod
    def from_model_price(cls, price: types.ModelPrice, source: str) -> Rates:
        """From a genai-prices ``ModelPrice``: the units a chat call reports (the others,
        such as audio or web searches, count 0 here)."""
        values = price.__dict__
        return cls(_from_table(values.get("input_mtok")) or Decimal(0),
                   _from_table(values.get("output_mtok")),
                   _from_table(values.get("cache_read_mtok")),
                   values.get("requests_kcount"), source)
