"""How requests go out: an adaptive concurrency limit, replica choice, retry timing and
redaction of secrets. Pure asyncio + stdlib; no SDK here."""

from __future__ import annotations

import asyncio
import collections
import email.utils
import random
import re
import time
from dataclasses import dataclass
from typing import Iterable

__all__ = ["AdaptiveLimit", "Replica", "pick_replica", "retry_after_seconds", "backoff_delay",
           "Redactor"]


class AdaptiveLimit:
    """At most ``limit`` requests in flight. Rate limiting halves the limit, once per
    window (the requests sent since the last cut); ``limit`` successes in a row raise it
    by one, up to ``maximum``. A server's Retry-After pauses every new request."""

    def __init__(self, maximum: int):
        self.maximum = max(1, int(maximum))
        self.limit = self.maximum
        self.lowest = self.maximum
        self.active = 0
        self.window = 0
        self._successes = 0
        self._resume_at = 0.0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self) -> int:
        """Wait for a slot; returns the window the request is sent in."""
        while True:
            delay = self._resume_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if self.active < self.limit:
                self.active += 1
                return self.window
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the slot we were given on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.active
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def succeeded(self) -> None:
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self.limit += 1
            self._successes = 0
            self._wake()

    def rate_limited(self, window: int, retry_after: float | None) -> None:
        if window == self.window:
            self.limit = max(1, self.limit // 2)
            self.lowest = min(self.lowest, self.limit)
            self.window += 1
        self._successes = 0
        if retry_after:
            self._resume_at = max(self._resume_at, time.monotonic() + retry_after)


@dataclass
class Replica:
    """One base URL and its client; counters drive least-outstanding-requests."""

    url: str
    client: object
    outstanding: int = 0
    sent: int = 0
    #: connection failures since this replica last answered anything
    failures: int = 0


def pick_replica(replicas: Iterable[Replica]) -> Replica:
    """The healthy replica with the fewest requests in flight (ties: fewest sent)."""
    return min(replicas, key=lambda r: (r.failures > 0, r.outstanding, r.sent))


def retry_after_seconds(headers, now: float | None = None) -> float | None:
    """Seconds a server asks to wait: ``retry-after-ms``, ``Retry-After`` in seconds or
    as an HTTP-date; None when absent or unreadable."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: between half and all of ``base * 2**attempt``."""
    return min(cap, base * (2 ** attempt)) * random.uniform(0.5, 1.0)


class Redactor:
    """Removes a key (and anything that looks like one) from text."""

    _PATTERNS = [re.compile(r"sk-[A-Za-z0-9_\-]{6,}"),
                 re.compile(r"(?i)(bearer\s+)\S+")]

    def __init__(self, *secrets: str | None):
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = self._PATTERNS[0].sub("sk-***", text)
        return self._PATTERNS[1].sub(r"\1***", text)
