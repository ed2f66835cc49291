"""open_store(): the one way to get a store, from a URL or None (in-memory)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from prometheus_client import REGISTRY, CollectorRegistry
from redis.asyncio import Redis, RedisCluster
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
    registry: CollectorRegistry = REGISTRY,
    metrics: StoreMetrics | None = None,
) -> AugmentationStore:
    """A store for `url`: None for the in-memory backend (one process), else a Redis URL:
    redis://[user:pass@]host:port/db, rediss://... (TLS),
    redis+sentinel://[user:pass@]h1:p1,h2:p2/<master>[/db] (rediss+sentinel:// for TLS),
    redis+cluster://[user:pass@]h1:p1[,h2:p2] (rediss+cluster:// for TLS).
    Connections are made lazily: an unreachable Redis shows up as StoreUnavailable on the
    first call (call `await store.ping()` to check at start-up)."""
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
    )
    metrics = metrics if metrics is not None else StoreMetrics(registry)
    if url is None or url in ("", "memory://"):
        return MemoryStore(config, metrics)
    return RedisStore(redis_client(url, op_timeout_s=op_timeout_s), config, metrics)


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


def redis_client(url: str, *, op_timeout_s: float) -> RedisClient:
    """A redis-py asyncio client for any of the supported URL schemes."""
    if not url.startswith(SCHEMES):
        raise ValueError(
            f"unsupported store URL {redact(url)}: use one of {', '.join(SCHEMES)}, "
            "or leave it unset for the in-memory store"
        )
    common = _common_kwargs(op_timeout_s)
    if url.startswith(("redis://", "rediss://")):
        return Redis.from_url(url, **common)
    parsed = _parse_multi_host(url)
    tls = _tls_kwargs(parsed)
    auth = {"username": parsed.username, "password": parsed.password}
    if "+cluster://" in url:
        nodes = [ClusterNode(host, port or 6379) for host, port in parsed.hosts]
        return RedisCluster(startup_nodes=nodes, **auth, **tls, **common)
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
    return sentinel.master_for(parsed.path[0], db=db, **auth, **tls)
