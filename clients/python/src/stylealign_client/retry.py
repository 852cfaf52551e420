"""When and how long to wait before trying a failed call again."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

from .errors import StyleAlignError


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that failed with a transient status.

    A call is tried at most `max_attempts` times (1: no retry), and only while its status code is
    in `retry_codes` (default ``UNAVAILABLE`` and ``RESOURCE_EXHAUSTED``) and its ``ErrorInfo``
    reason is not in `no_retry_reasons` (default ``OVER_MEMORY_BUDGET``). `Generate` is retried
    only when it failed before any event arrived.

    The wait before attempt *n + 1*: when the error carries ``google.rpc.RetryInfo``, its
    ``retry_delay`` (never less; up to `retry_info_jitter` of it added so that clients told the
    same delay do not come back at the same instant). Otherwise exponential backoff with jitter:
    ``b = min(max_backoff, initial_backoff * multiplier ** (n - 1))``, waited as a uniform draw
    in ``[b * (1 - jitter), b]``.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.5
    max_backoff: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retry_info_jitter: float = 0.1
    retry_codes: frozenset = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}))
    # ``ErrorInfo`` reasons that the same request meets again however long it waits: a request
    # over the server's memory budget needs fewer images or a smaller size, not a retry.
    no_retry_reasons: frozenset = field(default_factory=lambda: frozenset({"OVER_MEMORY_BUDGET"}))

    def __post_init__(self):
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool) or self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be an integer >= 1, got {self.max_attempts!r}")
        for name in ("initial_backoff", "max_backoff", "multiplier", "jitter", "retry_info_jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be a number >= 0, got {value!r}")
        if self.jitter > 1:
            raise ValueError(f"jitter: must be in [0, 1], got {self.jitter!r}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: must be >= 1, got {self.multiplier!r}")

    def delay(self, attempt: int, error: StyleAlignError, rng: random.Random | None = None) -> float | None:
        """Seconds to wait after failed attempt number `attempt` (1-based) before the next one, or
        None when the call must not be tried again."""
        if error.code not in self.retry_codes or attempt >= self.max_attempts:
            return None
        if error.reason is not None and error.reason in self.no_retry_reasons:
            return None
        rng = rng or random
        hinted = error.retry_delay
        if hinted is not None and hinted >= 0:
            return hinted * (1.0 + rng.uniform(0.0, self.retry_info_jitter))
        backoff = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return rng.uniform(backoff * (1.0 - self.jitter), backoff)


NO_RETRY = RetryPolicy(max_attempts=1)
