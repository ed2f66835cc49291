"""open_store(): the one way to get a store, from a URL or None (in-memory)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from prometheus_client import REGISTRY, CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from cache_store.memory import MemoryStore
from cache_store.metrics import StoreMetrics
from cache_store.redis_store import RedisClient, RedisStore
from cache_store.store import AugmentationStore
from cache_store.types import StoreConfig

SCHEMES = (
    "redis://",
    "rediss://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)
# TLS options forwarded from the query string of sentinel and cluster URLs (redis:// and
# rediss:// URLs are parsed by redis-py itself, which reads the same names).
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


def open_store(
    url: str | None,
    *,
    payload_ttl_s: float = 7 * 24 * 3600.0,
    max_queue_length: int = 10_000,
    visibility_timeout_s: float = 120.0,
    max_deliveries: int = 3,
    max_payload_bytes: int = 4 << 20,
    op_timeout_s: float = 1.0,
    pending_ttl_s: float = 6 * 3600.0,
    failed_ttl_s: float = 3600.0,
    declined_ttl_s: float = 24 * 3600.0,
    max_dead_letters: int = 10_000,
    poll_interval_s: float = 0.25,
    memory_capacity_bytes: int = 1 << 30,
    max_connections: int = 32,
    breaker_failures: int = 5,
    breaker_cooldown_s: float = 1.0,
    events_health_check_s: float = 5.0,
    registry: CollectorRegistry = REGISTRY,
    metrics: StoreMetrics | None = None,
) -> AugmentationStore:
    """A store for `url`: None for the in-memory backend (one process), else a Redis URL:
    redis://[user:pass@]host:port/db, rediss://... (TLS),
    redis+sentinel://[user:pass@]h1:p1,h2:p2/<master>[/db] (rediss+sentinel:// for TLS),
    redis+cluster://[user:pass@]h1:p1[,h2:p2] (rediss+cluster:// for TLS).
    Connections are made lazily: an unreachable Redis shows up as StoreUnavailable on the
    first call (call `await store.ping()` to check at start-up).

    `max_connections` bounds the connections of this store (per node on a Cluster): with a
    single Redis or Sentinel a caller waits for a free one (within its time budget) rather
    than opening more, so a slow Redis cannot be flooded with connections. The events
    listener and a worker's blocking claim each hold one; keep it at 4 or more."""
    if max_connections < 2:
        raise ValueError(f"max_connections must be at least 2, got {max_connections}")
    config = StoreConfig(
        payload_ttl_s=payload_ttl_s,
        max_queue_length=max_queue_length,
        visibility_timeout_s=visibility_timeout_s,
        max_deliveries=max_deliveries,
        max_payload_bytes=max_payload_bytes,
        op_timeout_s=op_timeout_s,
        pending_ttl_s=pending_ttl_s,
        failed_ttl_s=failed_ttl_s,
        declined_ttl_s=declined_ttl_s,
        max_dead_letters=max_dead_letters,
        poll_interval_s=poll_interval_s,
        memory_capacity_bytes=memory_capacity_bytes,
        breaker_failures=breaker_failures,
        breaker_cooldown_s=breaker_cooldown_s,
        events_health_check_s=events_health_check_s,
    )
    metrics = metrics if metrics is not None else StoreMetrics(registry)
    if url is None or url in ("", "memory://"):
        return MemoryStore(config, metrics)
    client = redis_client(url, op_timeout_s=op_timeout_s, max_connections=max_connections)
    return RedisStore(client, config, metrics)


@dataclass(frozen=True)
class _MultiHostUrl:
    tls: bool
    hosts: list[tuple[str, int]]
    path: list[str]
    username: str | None
    password: str | None
    query: dict[str, str] = field(default_factory=dict)


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "@" not in netloc:
        return url
    userinfo, _, hosts = netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{hosts}{slash}{tail}"


def _parse_multi_host(url: str) -> _MultiHostUrl:
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    hosts: list[tuple[str, int]] = []
    for item in filter(None, netloc.split(",")):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            hosts.append((host.strip("[]"), int(port) if port else 0))
        except ValueError as exc:
            raise ValueError(f"bad host:port {item!r} in {redact(url)}") from exc
    if not hosts:
        raise ValueError(f"no host:port in {redact(url)}; e.g. {scheme}://h1:26379,h2:26379/...")
    return _MultiHostUrl(
        tls=scheme.startswith("rediss"),
        hosts=hosts,
        path=[unquote(p) for p in path.split("/") if p],
        username=username,
        password=password,
        query=dict(parse_qsl(query)),
    )


def _common_kwargs(op_timeout_s: float) -> dict[str, object]:
    return {
        # Every call is bounded by asyncio.timeout(op_timeout_s) in the store; the socket
        # read timeout stays off so that blocking stream reads are not cut short.
        "socket_connect_timeout": op_timeout_s,
        "socket_timeout": None,
        # One immediate retry replaces a pooled connection that died with a restarted Redis;
        # no backoff, since the caller's time budget is milliseconds to a second.
        "retry": Retry(NoBackoff(), 1),
        "protocol": 2,
        "client_name": "deliberate",
    }


def _tls_kwargs(parsed: _MultiHostUrl) -> dict[str, object]:
    if not parsed.tls:
        return {}
    options: dict[str, object] = {"ssl": True}
    options.update({k: v for k, v in parsed.query.items() if k in _TLS_OPTIONS})
    if "ssl_check_hostname" in parsed.query:
        options["ssl_check_hostname"] = parsed.query["ssl_check_hostname"].lower() == "true"
    return options


def redis_client(url: str, *, op_timeout_s: float, max_connections: int = 32) -> RedisClient:
    """A redis-py asyncio client for any of the supported URL schemes, with at most
    `max_connections` connections (per node on a Cluster)."""
    if not url.startswith(SCHEMES):
        raise ValueError(
            f"unsupported store URL {redact(url)}: use one of {', '.join(SCHEMES)}, "
            "or leave it unset for the in-memory store"
        )
    common = _common_kwargs(op_timeout_s)
    if url.startswith(("redis://", "rediss://")):
        # Blocking: past max_connections a command waits for a free connection (bounded by
        # the store's time budget) instead of opening another. Without it, every command
        # cut short by a timeout dropped its connection and the next one opened a new one:
        # 200 timed-out lookups against a hung Redis opened 201 connections.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=op_timeout_s, **common
        )
        return Redis.from_pool(pool)
    parsed = _parse_multi_host(url)
    tls = _tls_kwargs(parsed)
    auth = {"username": parsed.username, "password": parsed.password}
    if "+cluster://" in url:
        nodes = [ClusterNode(host, port or 6379) for host, port in parsed.hosts]
        return RedisCluster(
            startup_nodes=nodes, max_connections=max_connections, **auth, **tls, **common
        )
    if not parsed.path:
        raise ValueError(
            f"{redact(url)} names no master: use redis+sentinel://h1:26379,h2:26379/<master>[/db]"
        )
    db = int(parsed.path[1]) if len(parsed.path) > 1 else 0
    sentinel_auth = {
        "username": parsed.query.get("sentinel_username"),
        "password": parsed.query.get("sentinel_password"),
    }
    sentinel = Sentinel(
        [(host, port or 26379) for host, port in parsed.hosts],
        sentinel_kwargs={
            "socket_connect_timeout": op_timeout_s,
            "socket_timeout": op_timeout_s,
            **sentinel_auth,
            **tls,
        },
        **common,
    )
    return sentinel.master_for(
        parsed.path[0], db=db, max_connections=max_connections, **auth, **tls
    )
