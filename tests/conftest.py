pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.models",
    "tests.fixtures.redis_topologies",
    "tests.fixtures.store_backends",
]
