pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.redis_topologies",
    "tests.fixtures.models",
    "tests.fixtures.engine",
    "tests.fixtures.store_backends",
    "tests.fixtures.app_server",
]
