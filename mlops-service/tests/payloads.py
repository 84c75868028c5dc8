"""The contract's sample payloads (shared/contract/nextjs-client.md) and varied ones."""

from __future__ import annotations

import random
import uuid
from decimal import Decimal

SUCCESS = {
    "business_id": "3f0c9a52-5a55-4f55-9d4e-0b8f6d1f2a10",
    "conversation_id": "a9e1c0de-2b7f-4f7e-8a51-7c1b2d3e4f50",
    "session_id": "sess_1732190000_k3j2",
    "response_time_ms": 1432, "success_rate": 1.0,
    "tokens_used": 412, "prompt_tokens": 350, "completion_tokens": 62,
    "api_cost_usd": 7.7e-05, "model_name": "gemini-1.5-flash",
    "intent_detected": "appointment", "appointment_requested": True,
    "human_handoff_requested": False,
    "user_message_length": 58, "ai_response_length": 247,
    "response_type": "appointment_booking",
}

FAILURE = {
    "business_id": "unknown", "session_id": "sess_1732190042_x9p1",
    "response_time_ms": 30012, "success_rate": 0.0, "tokens_used": 0,
    "api_cost_usd": 0, "model_name": "gemini-1.5-flash",
    "intent_detected": "error", "appointment_requested": False,
    "human_handoff_requested": True, "user_message_length": 0,
    "ai_response_length": 0, "response_type": "error",
}

REQUIRED = [
    "business_id", "session_id", "response_time_ms", "success_rate", "tokens_used",
    "api_cost_usd", "model_name", "intent_detected", "appointment_requested",
    "human_handoff_requested", "user_message_length", "ai_response_length", "response_type",
]

MODELS = ["gemini-1.5-flash", "gemini-1.5-pro", "gpt-4o-mini"]
INTENTS = ["appointment", "pricing", "services", "contact", "general"]


def varied(n: int, businesses: list[str], seed: int = 7) -> list[dict]:
    """``n`` realistic messages spread over ``businesses``, deterministic for ``seed``."""
    rng = random.Random(seed)
    events = []
    conversations = {b: [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(5)]
                     for b in businesses}
    for i in range(n):
        business = businesses[i % len(businesses)]
        prompt, completion = rng.randint(20, 900), rng.randint(5, 400)
        requested = rng.random() < 0.3
        failed = rng.random() < 0.05
        event = {
            "business_id": business,
            "conversation_id": rng.choice(conversations[business]),
            "session_id": f"sess_{i}",
            "response_time_ms": rng.randint(150, 9000),
            "success_rate": 0.0 if failed else 1.0,
            "tokens_used": prompt + completion,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "api_cost_usd": float(Decimal(rng.randint(0, 5000)) / Decimal(1_000_000)),
            "model_name": rng.choice(MODELS),
            "intent_detected": "appointment" if requested else rng.choice(INTENTS),
            "appointment_requested": requested,
            "human_handoff_requested": failed or rng.random() < 0.05,
            "user_message_length": rng.randint(1, 500),
            "ai_response_length": rng.randint(1, 2000),
            "response_type": "error" if failed else
                ("appointment_booking" if requested else "text"),
        }
        if requested:
            event["appointment_booked"] = rng.random() < 0.6
        if rng.random() < 0.2:
            event["user_satisfaction"] = rng.randint(1, 5)
        events.append(event)
    return events


def money(value) -> Decimal:
    """A cost as an exact decimal (6 places, as the app sends it)."""
    return Decimal(str(value)).quantize(Decimal("0.000001"))
