"""``GET /openapi.json``: the OpenAPI 3.1 document of the service.

Request-body schemas are generated from the pydantic models that validate
requests (so they cannot drift); the paths, responses and result shapes
are written out here by hand and kept honest by schemathesis
(tests/test_hostile.py), which checks every response against them.
"""

from __future__ import annotations

from functools import cache

from flask import Blueprint, jsonify
from pydantic.json_schema import models_json_schema

from ..schemas import MAX_WINDOW_DAYS, MetricsEvent, RefreshRequest
from ..version import __version__

bp = Blueprint("openapi", __name__)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {401: "Missing X-API-Key",
            403: "Unknown X-API-Key, or a key without this scope (one answer for both)",
            404: "No such route: an id holding a line break cannot be routed",
            408: "The body did not arrive within BODY_READ_TIMEOUT_SECONDS",
            413: "Body too large", 415: "Content-Type is not application/json",
            409: "event_id already stored for another business (errors names event_id)",
            422: "Invalid fields, each named", 429: "Rate limit exceeded; see Retry-After",
            503: "Database unavailable (and, for writes, spool full)"}
    return {str(c): _json(_ERROR, text[c]) for c in codes}


def _otlp(signal: str, summary: str) -> dict:
    """An OTLP/HTTP export path: protobuf or OTLP/JSON in, the same encoding out."""
    def both(json_schema: dict, description: str) -> dict:
        return {"description": description, "content": {
            "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": json_schema}}}

    status = {"type": "object", "properties": {"code": {"type": "integer"},
                                               "message": {"type": "string"}}}
    failures = {400: "Undecodable body (not retryable)", 401: "Missing key",
                403: "Unknown key, or a key without the write scope", 408: "Body too slow",
                413: "Body too large, as sent or inflated", 415: "Another media type or coding",
                429: "Rate limit exceeded; see Retry-After",
                503: "Database unavailable and spool full; see Retry-After"}
    return {"post": {
        "summary": summary, "security": [{"ApiKey": []}, {"Bearer": []}],
        "requestBody": {"required": True, **both(
            {"type": "object"}, f"OTLP Export{signal}ServiceRequest")},
        "responses": {"200": both({"type": "object"}, f"Export{signal}ServiceResponse "
                                                      "(partial_success when refused)"),
                      **{str(c): both(status, f"google.rpc.Status: {text}")
                         for c, text in failures.items()}}}}


@cache
def document() -> dict:
    """The OpenAPI document (built once per process)."""
    _, defs = models_json_schema(
        [(MetricsEvent, "validation"), (RefreshRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = defs["$defs"]
    schemas["Error"] = {
        "type": "object", "required": ["status", "error", "message"],
        "properties": {
            "status": {"const": "error"}, "error": {"type": "string"},
            "message": {"type": "string"},
            "errors": {"type": "array", "items": {
                "type": "object", "required": ["field", "problem"],
                "properties": {"field": {"type": "string"}, "problem": {"type": "string"}}}},
        },
    }
    schemas["TrackResult"] = {
        "type": "object", "required": ["status", "storage", "event_id", "timestamp"],
        "properties": {"status": {"const": "success"}, "message": {"type": "string"},
                       "storage": {"enum": ["stored", "queued"]},
                       "event_id": {"type": "string"}, "timestamp": {"type": "string"}},
    }
    schemas["BatchResult"] = {
        "type": "object", "required": ["status", "accepted", "rejected", "results"],
        "properties": {
            "status": {"enum": ["success", "partial"]},
            "storage": {"enum": ["stored", "queued", None]},
            "accepted": {"type": "integer"}, "rejected": {"type": "integer"},
            "results": {"type": "array", "items": {"type": "object",
                                                   "required": ["index", "status"]}},
        },
    }
    event = {"$ref": "#/components/schemas/MetricsEvent"}
    security = [{"ApiKey": []}]
    json_object = {"type": "object"}
    path_id = {"type": "string", "minLength": 1, "maxLength": 255}
    business = {"name": "business_id", "in": "path", "required": True, "schema": path_id}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlops-service", "version": __version__,
                 "description": "Records how a chat app's AI model behaves: events in "
                                "Postgres, metrics for Prometheus, analytics per business."},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header",
                                           "name": "X-API-Key"},
                                "MetricsToken": {"type": "http", "scheme": "bearer"},
                                "Bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/track": {"post": {
                "summary": "Store one chat message's metrics", "security": security,
                "requestBody": {"required": True, **_json(event, "MetricsData")},
                "responses": {
                    "201": _json({"$ref": "#/components/schemas/TrackResult"}, "Stored"),
                    "202": _json({"$ref": "#/components/schemas/TrackResult"}, "Queued"),
                    **_errors(401, 403, 408, 409, 413, 415, 422, 429, 503)}}},
            "/track/batch": {"post": {
                "summary": "Store many events in one transaction", "security": security,
                "requestBody": {"required": True, **_json(
                    {"type": "array", "items": event, "minItems": 1}, "Events")},
                "responses": {
                    "207": _json({"$ref": "#/components/schemas/BatchResult"}, "Per item"),
                    **_errors(401, 403, 408, 413, 415, 422, 429, 503)}}},
            "/refresh-metrics": {"post": {
                "summary": "Recompute Postgres-derived gauges (no key needed)",
                "requestBody": {"required": False, **_json(
                    {"$ref": "#/components/schemas/RefreshRequest"}, "Trigger")},
                "responses": {"200": _json(json_object, "Refreshed"),
                              **_errors(408, 413, 415, 422, 429, 503)}}},
            "/analytics/{business_id}": {"get": {
                "summary": "Aggregates for one business", "security": security,
                "parameters": [business, {
                    "name": "days", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_DAYS,
                               "default": 30}}],
                "responses": {"200": _json(json_object, "Analytics"),
                              **_errors(401, 403, 404, 422, 429, 503)}}},
            "/conversations/{conversation_id}": {"delete": {
                "summary": "Erase one conversation: its events, spooled events and rollup share",
                "security": security,
                "parameters": [{"name": "conversation_id", "in": "path", "required": True,
                                "schema": path_id}],
                "responses": {"200": _json(json_object, "Erased (zeros when nothing matched)"),
                              **_errors(401, 403, 404, 422, 429, 503)}}},
            "/sessions/{session_id}": {"delete": {
                "summary": "Erase one session: its events, spooled events and rollup share",
                "security": security,
                "parameters": [{"name": "session_id", "in": "path", "required": True,
                                "schema": path_id}],
                "responses": {"200": _json(json_object, "Erased (zeros when nothing matched)"),
                              **_errors(401, 403, 404, 422, 429, 503)}}},
            "/erasures": {"get": {
                "summary": "The erasure audit trail, newest first (needs an erase key)",
                "security": security,
                "parameters": [
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                "default": 100}},
                    {"name": "before", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}],
                "responses": {"200": _json({
                    "type": "object", "required": ["erasures", "next_before"],
                    "properties": {
                        "erasures": {"type": "array", "items": {"type": "object"}},
                        "next_before": {"type": ["integer", "null"]}}}, "One page"),
                    **_errors(401, 403, 422, 429, 503)}}},
            "/businesses/{business_id}": {"delete": {
                "summary": "Erase one business: its events, spooled events and rollups",
                "security": security, "parameters": [business],
                "responses": {"200": _json(json_object, "Erased (zeros when nothing matched)"),
                              **_errors(401, 403, 404, 422, 429, 503)}}},
            "/businesses": {"get": {
                "summary": "Each business's messages, tokens and cost over a window, "
                           "busiest first", "security": security,
                "parameters": [{
                    "name": "days", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_DAYS,
                               "default": 30}}],
                "responses": {"200": _json({
                    "type": "object", "required": ["days", "businesses"],
                    "properties": {"days": {"type": "integer"}, "period": {"type": "string"},
                                   "timestamp": {"type": "string"},
                                   "businesses": {"type": "array", "items": {
                        "type": "object",
                        "required": ["business_id", "messages", "tokens", "api_cost_usd",
                                     "success_rate"],
                        "properties": {"business_id": {"type": "string"},
                                       "messages": {"type": "integer"},
                                       "tokens": {"type": "integer"},
                                       "api_cost_usd": {"type": "number"},
                                       "success_rate": {"type": "number"}}}}}},
                    "Businesses"), **_errors(401, 403, 422, 429, 503)}}},
            "/v1/traces": _otlp("Trace", "OTLP/HTTP traces: each LLM call span stored as one "
                                         "event (docs/otlp.md)"),
            "/v1/metrics": _otlp("Metrics", "OTLP/HTTP metrics: answered, not stored "
                                            "(rejected_data_points)"),
            "/v1/logs": _otlp("Logs", "OTLP/HTTP logs: answered, not stored "
                                      "(rejected_log_records)"),
            "/": {"get": {"summary": "The dashboard (HTML page; reads /businesses, "
                                     "/analytics and /health/detailed)",
                          "responses": {"200": {"description": "HTML page", "content": {
                              "text/html": {"schema": {"type": "string"}}}}}}},
            "/health": {"get": {"summary": "Liveness",
                                "responses": {"200": _json(json_object, "Alive")}}},
            "/health/ready": {"get": {"summary": "Readiness (database round trip)",
                                      "responses": {"200": _json(json_object, "Ready"),
                                                    "503": _json(json_object, "Not ready; "
                                                                 "reason says why (draining, "
                                                                 "database down or full)")}}},
            "/health/detailed": {"get": {
                "summary": "Uptime, version, database, pool, spool, storage (size against "
                           "DATABASE_SIZE_LIMIT), keys (details need a read key when keys "
                           "are set)",
                "security": [{"ApiKey": []}, {}],
                "responses": {"200": _json(json_object, "Report")}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (Bearer MLOPS_METRICS_TOKEN, or a key with the "
                           "read scope, when either is set)",
                "security": [{"MetricsToken": []}, {"ApiKey": []}, {}],
                "responses": {"200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "401": _json(_ERROR, "Missing or wrong credentials")}}},
        },
    }


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document describing every endpoint and the request schemas."""
    return jsonify(document())
