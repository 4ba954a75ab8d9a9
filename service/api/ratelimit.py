"""Per-tenant rate limit of submissions, shared by every API process through Redis (``limits``).

A moving window counts the submissions of the last 60 seconds, so a burst cannot double at the
edge of a fixed window. Only requests that pass their checks count: a client fixing a refused
request (415, 422) does not spend its quota.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis import Redis

from service.contract.keys import RATE_LIMIT_PREFIX


class RateLimit:
    def __init__(self, redis: Redis, url: str, per_minute: int) -> None:
        self.item = RateLimitItemPerMinute(per_minute)
        storage = RedisStorage(url, connection_pool=redis.connection_pool, key_prefix=RATE_LIMIT_PREFIX)
        self.limiter = MovingWindowRateLimiter(storage)

    def wait(self, tenant: str) -> int | None:
        """None while ``tenant`` is below its limit (nothing is counted), else seconds to wait."""
        return None if self.limiter.test(self.item, tenant) else self._reset_in(tenant)

    def hit(self, tenant: str) -> int | None:
        """Count one request; None if it is within the limit, else seconds to wait."""
        return None if self.limiter.hit(self.item, tenant) else self._reset_in(tenant)

    def _reset_in(self, tenant: str) -> int:
        reset_at, _ = self.limiter.get_window_stats(self.item, tenant)
        return max(1, math.ceil(reset_at - time.time()))
