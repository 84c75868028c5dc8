"""OTLP/HTTP wire format: request bodies in, responses out (opentelemetry-proto's classes).

Source: the OTLP specification, opentelemetry-proto ``docs/specification.md``
("OTLP/HTTP"). A request is binary protobuf (``application/x-protobuf``) or
OTLP/JSON (``application/json``: the proto3 JSON mapping, except that trace
and span ids are hex strings, not base64), optionally ``Content-Encoding:
gzip``. The answer uses the request's encoding: an ``Export*ServiceResponse``
on success, a ``google.rpc.Status`` on a 4xx/5xx.

Every body is bounded before it is parsed: the bytes received by
:func:`mlops.bodies.read_body`, and, for gzip, the bytes it inflates to
(inflated with a maximum length, so a small "zip bomb" costs at most the
cap). Protobuf's own parsers bound nesting (100 levels).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError, Message
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# The JSON keys of OTLP/JSON that hold ids as hex (specification, "JSON Protobuf
# Encoding"): spans' and links' ``traceId``/``spanId``, spans' ``parentSpanId``.
_HEX_ID_KEYS = ("traceId", "spanId", "parentSpanId")


class BadOtlp(BadRequest):
    """400: the body cannot be decoded as the signal's export request (not retryable)."""


def media_type(content_type: str | None) -> str:
    """``PROTOBUF`` or ``JSON`` from a ``Content-Type`` header (parameters ignored).

    Raises werkzeug's ``UnsupportedMediaType`` (415) for any other type.
    """
    essence = (content_type or "").split(";", 1)[0].strip().lower()
    if essence not in (PROTOBUF, JSON):
        raise UnsupportedMediaType(f"Content-Type must be {PROTOBUF} or {JSON}")
    return essence


def inflate(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``body`` decoded per ``Content-Encoding`` (none, ``identity`` or ``gzip``).

    At most ``limit`` bytes are inflated: past that, ``RequestEntityTooLarge``
    (413). A truncated or corrupt gzip stream is a :class:`BadOtlp` (400);
    another coding is a 415 (RFC 9110, section 15.5.16).
    """
    coding = (content_encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding != "gzip":
        raise UnsupportedMediaType("Content-Encoding must be gzip or absent")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadOtlp(f"the gzip body cannot be inflated: {exc}") from None
    if len(data) > limit:
        raise RequestEntityTooLarge(f"the body must inflate to at most {limit} bytes")
    if not inflater.eof:
        raise BadOtlp("the gzip body is truncated")
    return data


def parse(data: bytes, encoding: str, message: Message) -> Message:
    """Fill ``message`` (an empty ``Export*ServiceRequest``) from ``data``; return it.

    Unknown JSON fields are ignored, as the specification asks of receivers.
    Raises :class:`BadOtlp` naming what is wrong.
    """
    try:
        if encoding == PROTOBUF:
            message.ParseFromString(data)
        else:
            tree = json.loads(data)
            _hex_ids_to_base64(tree)
            json_format.ParseDict(tree, message, ignore_unknown_fields=True)
    except (DecodeError, json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        kind = "protobuf" if encoding == PROTOBUF else "OTLP/JSON"
        raise BadOtlp(f"the body is not a valid {kind} "
                      f"{message.DESCRIPTOR.name}: {str(exc)[:200]}") from None
    return message


def _hex_ids_to_base64(node) -> None:
    """Rewrite OTLP/JSON's hex ids in place as base64, proto3 JSON's form for ``bytes``."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in _HEX_ID_KEYS:
                value = item.get(key)
                if isinstance(value, str):
                    try:
                        item[key] = base64.b64encode(bytes.fromhex(value)).decode()
                    except ValueError:
                        raise ValueError(f"{key} must be a hex string") from None
            stack.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))


def serialize(message: Message, encoding: str) -> bytes:
    """``message`` in ``encoding`` (``PROTOBUF`` or ``JSON``, lowerCamelCase keys)."""
    if encoding == PROTOBUF:
        return message.SerializeToString()
    return json_format.MessageToJson(message, indent=None).encode()


def _status_class() -> type[Message]:
    """``google.rpc.Status`` (code, message), built from its descriptor by protobuf.

    The failure body the specification asks for (``google/rpc/status.proto``);
    ``details`` (repeated Any, optional there) is left out.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="mlops/google_rpc_status.proto", package="google.rpc", syntax="proto3")
    status = proto.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                     label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    status.field.add(name="message", number=2,
                     type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                     label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    return message_factory.GetMessageClass(pool.Add(proto).message_types_by_name["Status"])


Status = _status_class()

# google.rpc.Code for the HTTP statuses this service answers (google/rpc/code.proto's
# HTTP mapping); the specification says clients do not act on it.
_RPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 408: 4, 413: 3, 415: 3, 429: 8, 503: 14}


def status_body(http_status: int, text: str, encoding: str) -> bytes:
    """A ``google.rpc.Status`` body for a failed request, in ``encoding``."""
    return serialize(Status(code=_RPC_CODE.get(http_status, 2), message=text), encoding)


@dataclass
class Rejections:
    """Items of one request refused: how many, and the first reason (for ``partial_success``).

    Every refusal goes through :meth:`reject`, so ``count`` and ``first_error``
    always describe the same items.
    """

    count: int = 0
    first_error: str = ""

    def reject(self, reason: str, count: int = 1) -> None:
        """Count ``count`` items refused for ``reason`` (the first reason is kept)."""
        if count <= 0:
            return
        self.count += count
        if not self.first_error:
            self.first_error = reason

    def error_message(self) -> str:
        """``partial_success.error_message``: the first reason, and how many others."""
        if self.count <= 1:
            return self.first_error
        return f"{self.first_error} (and {self.count - 1} more refused; this is the first)"
