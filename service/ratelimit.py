"""Per-tenant fixed-window rate limit in Redis (shared by every API process)."""

from __future__ import annotations

import time

from redis import Redis


def retry_after(redis: Redis, tenant: str, per_minute: int) -> int | None:
    """Count one request; None if allowed, else seconds until the window resets."""
    now = time.time()
    key = f"prism:rate:{tenant}:{int(now // 60)}"
    with redis.pipeline() as pipe:
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
    if count <= per_minute:
        return None
    return max(1, 60 - int(now % 60))
