"""Request schemas: the Next.js app's MetricsData, validated with pydantic.

The contract is ``shared/contract/nextjs-client.md``. Validation is strict
(a JSON string is not a number, ``1.0`` is not an integer) and bounded so
that every accepted value also fits its Postgres column: the store never
sees input it would reject. Fields the contract does not name are kept, in
``model_extra``, and stored as JSONB. The same models generate the OpenAPI
document served at ``/openapi.json``. An accepted event travels on as a
:class:`Record` (its id, receive time and price) to the outbox and the store.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from . import prices

INT32_MAX = 2**31 - 1  # Postgres integer
INT64_MAX = 2**63 - 1  # Postgres bigint
MAX_EXTRA_FIELDS = 64
# Days. The longest read window of /analytics and /businesses: a year (leap
# years included) of daily rollups keeps one call to a few ms of Postgres;
# ten years cost 1.1-1.3 s.
MAX_WINDOW_DAYS = 366
WindowDays = Annotated[int, Field(ge=1, le=MAX_WINDOW_DAYS)]


def _no_nul(value: str) -> str:
    # Postgres text and jsonb cannot hold U+0000.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


def _text(max_length: int, min_length: int = 1) -> Any:
    return Annotated[
        str, Field(min_length=min_length, max_length=max_length), AfterValidator(_no_nul)
    ]


Id = _text(255)
Label = _text(128)
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
Length = Annotated[int, Field(ge=0, le=INT32_MAX)]


class MetricsEvent(BaseModel):
    """One chat message's metrics (the contract's ``MetricsData``).

    Units: ``response_time_ms`` milliseconds, ``api_cost_usd`` US dollars,
    lengths in characters, tokens as counted by the model's provider.
    ``event_id`` is optional: the idempotency key; the service assigns a
    UUID when it is absent.
    """

    model_config = ConfigDict(
        strict=True,
        extra="allow",
        json_schema_extra={"additionalProperties": True},
    )

    event_id: _text(128) | None = None
    business_id: Id
    conversation_id: Id | None = None
    session_id: Id
    response_time_ms: Annotated[float, Field(ge=0, le=1e10, allow_inf_nan=False)]
    success_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    user_satisfaction: Annotated[float, Field(ge=-1e9, le=1e9, allow_inf_nan=False)] | None = None
    tokens_used: Count
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    api_cost_usd: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
    model_name: Label
    intent_detected: Label
    appointment_requested: bool
    human_handoff_requested: bool
    appointment_booked: bool | None = None
    user_message_length: Length
    ai_response_length: Length
    response_type: Label


@dataclass(frozen=True)
class Record:
    """An event ready to store: its idempotency key, server receive time and body.

    Made where a request's events are accepted (``mlops.ingest``) or read
    back from the spool (``mlops.outbox``); ``mlops.store.events`` encodes it
    as a row.
    """

    event_id: str
    received_at: datetime
    event: MetricsEvent

    @property
    def price(self) -> prices.Price:
        """The call's price by this process's table (``prices.current()``), at ``received_at``;
        computed once (``functools.cached_property`` would take a lock per call)."""
        price = self.__dict__.get("_price")
        if price is None:
            price = self.__dict__["_price"] = prices.current().price_event(
                self.event, self.received_at)
        return price


def price_all(records: Sequence[Record]) -> None:
    """Give each of ``records`` not priced yet its :attr:`Record.price`, by one call of the
    process's table (``prices.Table.price_events``): the same prices as one by one, for
    less per event. The store calls it before it encodes a batch."""
    todo = [r for r in records if "_price" not in r.__dict__]
    if todo:
        found = prices.current().price_events([r.event for r in todo],
                                               [r.received_at for r in todo])
        for record, price in zip(todo, found, strict=True):
            record.__dict__["_price"] = price


def _jsonb_problem(value: Any) -> str | None:
    """Why ``value`` (parsed JSON) cannot be stored in a jsonb column, or None."""
    if isinstance(value, str):
        return "contains the NUL character (U+0000)" if "\x00" in value else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if -INT64_MAX - 1 <= value <= INT64_MAX else "integer out of 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "number is not finite"
    if isinstance(value, list):
        return next(filter(None, map(_jsonb_problem, value)), None)
    if isinstance(value, dict):
        for k, v in value.items():
            problem = _jsonb_problem(k) or _jsonb_problem(v)
            if problem:
                return problem
        return None
    return f"unsupported type {type(value).__name__}"


class InvalidRequest(Exception):
    """The body failed validation; ``problems`` is ``[{"field", "problem"}]``."""

    def __init__(self, problems: list[dict]) -> None:
        super().__init__(f"{len(problems)} invalid field(s)")
        self.problems = problems


def parse_event(data: bytes | dict, prefix: tuple[str | int, ...] = ()) -> MetricsEvent:
    """Validate one event from raw JSON bytes or an already-parsed object.

    Raises :class:`InvalidRequest` naming each bad field, prefixed by
    ``prefix`` (a batch passes the item's index).
    """
    try:
        if isinstance(data, bytes | bytearray):
            event = MetricsEvent.model_validate_json(data)
        else:
            event = MetricsEvent.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc, prefix)) from None
    _check_extra(event, prefix)
    return event


def _check_extra(event: MetricsEvent, prefix: tuple[str | int, ...]) -> None:
    """Raise :class:`InvalidRequest` if the fields beyond the contract cannot be stored."""
    extra = event.model_extra
    if not extra:
        return
    problems = []
    if len(extra) > MAX_EXTRA_FIELDS:
        problems.append({"field": ".".join(map(str, prefix)) or "body",
                         "problem": f"at most {MAX_EXTRA_FIELDS} fields beyond the contract's"})
    for key, value in extra.items():
        problem = _jsonb_problem(key) or _jsonb_problem(value)
        if problem:
            problems.append({"field": ".".join(map(str, (*prefix, key[:64]))), "problem": problem})
    if problems:
        raise InvalidRequest(problems)


@functools.lru_cache(maxsize=4)
def _batch_adapter(limit: int) -> TypeAdapter:
    """A validator of a JSON array of 1 to ``limit`` events.

    pydantic-core checks the array's length before it validates any item, so
    an over-long array costs one error, not one per item (a 4 MB body of
    ``[{},{},...]`` validated item by item took a worker to 6.8 GB).
    """
    return TypeAdapter(Annotated[list[MetricsEvent], Field(min_length=1, max_length=limit)])


def parse_batch(body: bytes, limit: int) -> list[MetricsEvent | InvalidRequest]:
    """Validate a JSON array of 1 to ``limit`` events; one result per item, in order.

    Each result is the event, or the :class:`InvalidRequest` naming its bad
    fields (prefixed by the item's index). The array's length is checked
    first, then the whole array is validated in one pass (pydantic-core); only
    when some item fails are the items validated one by one to tell which.
    Raises :class:`InvalidRequest` for a body that is not JSON, not an array,
    or of the wrong length (field ``body``). The caller bounds ``body``'s
    size (``MAX_BATCH_BODY_BYTES``), which bounds the parse.
    """
    try:
        events = _batch_adapter(limit).validate_json(body)
    except ValidationError as exc:
        _raise_for_the_array(exc, limit)
        events = None
    else:
        try:
            for index, event in enumerate(events):
                _check_extra(event, (index,))
        except InvalidRequest:
            events = None
    if events is not None:
        return events
    items = pydantic_core.from_json(body)  # JSON, an array of the right length: checked above
    results: list[MetricsEvent | InvalidRequest] = []
    for index, item in enumerate(items):
        try:
            results.append(parse_event(item, prefix=(index,)))
        except InvalidRequest as exc:
            results.append(exc)
    return results


def _raise_for_the_array(error: ValidationError, limit: int) -> None:
    """Raise :class:`InvalidRequest` if ``error`` is about the body as a whole.

    That is: not JSON, not an array, or not 1 to ``limit`` items. Errors
    located in an item (their ``loc`` starts with its index) return, for the
    items to be told apart one by one.
    """
    for item in error.errors(include_url=False, include_input=False):
        if item["loc"]:
            continue
        if item["type"] == "json_invalid":
            problem = item["msg"]
        elif item["type"] in ("too_long", "too_short"):
            got = item.get("ctx", {}).get("actual_length")
            problem = f"must hold 1 to {limit} events" + (f", got {got}" if got is not None else "")
        else:
            problem = "must be a JSON array of events"
        raise InvalidRequest([{"field": "body", "problem": problem}])


class RefreshRequest(BaseModel):
    """Body of ``POST /refresh-metrics``; the app sends ``{"trigger": "new_metrics"}``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    trigger: _text(64) | None = None


def field_errors(error: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[dict]:
    """Turn a pydantic error into ``[{"field": "a.b", "problem": "..."}]``.

    The offending input is never echoed back (it may be a megabyte long or
    hostile); only the field's dotted path and pydantic's message are kept.
    """
    problems = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        loc = prefix + tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "body"
        message = item["msg"]
        if item["type"] == "missing":
            message = "is required"
        problems.append({"field": field, "problem": message})
    return problems
