"""Request pacing shared by every protocol: :class:`TokenBucket`, a thread-safe
:class:`~medsync.sources.base.RequestLimiter`.

Standard library only: a client makes one per process, a run may share one between threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from medsync.errors import ConfigError


class TokenBucket:
    """Thread-safe token bucket: on average at most ``rate`` acquisitions per second.

    ``burst`` tokens can be spent at once (default 1: calls are simply spaced
    ``1/rate`` seconds apart). A caller that finds the bucket empty reserves the
    next token and sleeps outside the lock, so concurrent callers queue up fairly
    instead of spinning.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ConfigError(f"rate limit must be positive, got {rate!r}")
        self._rate = float(rate)
        self._burst = max(float(burst), 1.0)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self._burst
        self._last = clock()

    @property
    def rate(self) -> float:
        return self._rate

    def acquire(self) -> float:
        """Takes one token, sleeping until it is available; returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= 1.0
            # A negative balance is a debt: the tokens already promised to callers still asleep.
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
