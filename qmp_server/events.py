"""The event bus: one place that timestamps events and hands them to every session."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Subscriber = Callable[[dict[str, Any]], None]


def timestamp() -> dict[str, int]:
    """QEMU's event timestamp: wall-clock seconds and microseconds."""
    now_us = time.time_ns() // 1000
    return {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000}


class EventBus:
    """Broadcasts events to subscribers (negotiated sessions) in emission order.

    Subscribers must not block: each one only queues the message for its own writer, so
    an event is never interleaved inside another message and a slow client does not
    delay the others.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        """Deliver every later event to ``subscriber``."""
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop delivering to ``subscriber`` (no error if it was not subscribed)."""
        try:
            self._subscribers.remove(subscriber)
        except ValueError:
            pass

    def emit(self, event: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send ``event`` to every subscriber; returns the message sent."""
        # Key order as QEMU writes it.
        message: dict[str, Any] = {"timestamp": timestamp(), "event": event}
        if data is not None:
            message["data"] = data
        for subscriber in list(self._subscribers):
            subscriber(message)
        return message
