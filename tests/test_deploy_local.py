"""deploy/local's launcher: the process machinery (start, readiness, pid files, clean stop,
SIGKILL escalation, failure at start-up), driven with a stand-in `deliberate` that serves
/health and /ready like the real server and worker do.

The end-to-end run with the real server and workers and the openai client lives in its own
test once they exist; this one needs only `redis-server`.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "deploy" / "local" / "launcher.py"

# A stand-in for the `deliberate` console script: `serve --host H --port P --redis-url U` or
# `worker --redis-url U` (port from DELIBERATE_WORKER_METRICS_PORT). It checks that Redis
# answers, records how it was called, and serves /health at once and /ready after a delay.
STUB = textwrap.dedent(
    """\
    #!/usr/bin/env python3
    import http.server, json, os, signal, socket, sys, time, urllib.parse
    from pathlib import Path

    args = sys.argv[1:]
    role = args[0]
    if os.environ.get("STUB_FAIL_ROLE") == role:
        print(f"{role}: failing on purpose", flush=True)
        sys.exit(3)
    port = int(args[args.index("--port") + 1]) if role == "serve" else int(
        os.environ["DELIBERATE_WORKER_METRICS_PORT"])
    url = urllib.parse.urlparse(args[args.index("--redis-url") + 1])
    with socket.create_connection((url.hostname, url.port), timeout=2) as s:
        s.sendall(b"PING\\r\\n")
        assert s.recv(16).startswith(b"+PONG"), "redis did not answer"
    out = Path(os.environ["STUB_DIR"]) / f"{role}-{port}.json"
    out.write_text(json.dumps({"argv": args, "pid": os.getpid(), "port": port}))
    if os.environ.get("STUB_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    drain = float(os.environ.get("STUB_DRAIN", "0"))
    if drain:  # like `deliberate serve`: finishes the requests in progress, then exits
        signal.signal(signal.SIGTERM, lambda *a: (time.sleep(drain), sys.exit(0)))
    linger = os.environ.get("STUB_CHILD_LINGER")
    if linger and role == "serve":
        # Like vLLM's engine core: a child in the server's process group that takes a while
        # to exit after SIGTERM, and may outlive its parent.
        import subprocess
        # On SIGTERM it records whether its parent (the server) was still alive then.
        record = Path(os.environ["STUB_DIR"]) / "child-sigterm.json"
        child = subprocess.Popen([sys.executable, "-c", (
            "import json, os, signal, sys, time\\n"
            "def on_term(*a):\\n"
            f"    alive = os.path.exists('/proc/{os.getpid()}') and open("
            f"'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'\\n"
            f"    open({str(record)!r}, 'w').write(json.dumps({{'server_alive': alive}}))\\n"
            f"    time.sleep({linger}); sys.exit(0)\\n"
            "signal.signal(signal.SIGTERM, on_term)\\n"
            "while True: time.sleep(1)\\n")])
        (Path(os.environ["STUB_DIR"]) / "child.pid").write_text(str(child.pid))
    delay = float(os.environ.get("STUB_READY_DELAY", "0"))
    started = time.monotonic()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                code = 200
            elif self.path == "/ready":
                code = 200 if time.monotonic() - started >= delay else 503
            else:
                code = 404
            self.send_response(code)
            self.end_headers()

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not on PATH: run scripts/setup.sh (apt-get install redis-server)"
        )
    path = tmp_path / "deliberate-stub"
    path.write_text(STUB)
    path.chmod(0o755)
    (tmp_path / "calls").mkdir()
    return path


def launcher(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def up_args(run_dir: Path, stub: Path, *extra: str) -> list[str]:
    return [
        "up", "--run-dir", str(run_dir), "--deliberate", f"{sys.executable} {stub}",
        "--server-port", "0", "--worker-base-port", "0", "--ready-timeout", "30",
        *extra,
    ]  # fmt: skip


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_help_runs_without_the_project_installed():
    result = launcher("--help")
    assert result.returncode == 0
    for command in ("up", "down", "status"):
        assert command in result.stdout


def test_up_starts_redis_server_and_two_workers_then_down_stops_them(tmp_path, stub):
    run_dir = tmp_path / "run"
    env = {"STUB_DIR": str(tmp_path / "calls"), "STUB_READY_DELAY": "1.5"}
    started = launcher(*up_args(run_dir, stub), env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        for name in ("redis", "server", "worker-0", "worker-1"):
            assert f"{name}: ready" in started.stdout
        state = json.loads((run_dir / "state.json").read_text())
        pids = {p.stem: int(p.read_text().split()[0]) for p in (run_dir / "pids").glob("*.pid")}
        assert set(pids) == {"redis", "server", "worker-0", "worker-1"}
        assert all(alive(pid) for pid in pids.values())

        calls = [json.loads(p.read_text()) for p in (tmp_path / "calls").glob("*.json")]
        serve = [c for c in calls if c["argv"][0] == "serve"]
        workers = [c for c in calls if c["argv"][0] == "worker"]
        assert len(serve) == 1 and len(workers) == 2
        assert serve[0]["argv"][:3] == ["serve", "--host", "127.0.0.1"]
        redis_url = state["redis_url"]
        assert redis_url.startswith("redis://127.0.0.1:")
        for call in calls:
            assert call["argv"][call["argv"].index("--redis-url") + 1] == redis_url
        # Two workers on one machine: each its own metrics port.
        assert len({w["port"] for w in workers}) == 2
        assert state["api_base"] == f"{state['server_url']}/v1"
        assert (run_dir / "logs" / "server.log").is_file()

        status = launcher("status", "--run-dir", str(run_dir))
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("ready") - status.stdout.count("not ready") == 4

        again = launcher(*up_args(run_dir, stub), env=env)
        assert again.returncode == 1
        assert "already running" in again.stderr
    finally:
        stopped = launcher("down", "--run-dir", str(run_dir), "--grace", "10")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "SIGKILL" not in stopped.stdout  # they all stopped on SIGTERM
    assert not any(alive(pid) for pid in pids.values())
    assert not port_open(state["redis_port"])
    assert not (run_dir / "pids").exists()
    assert launcher("down", "--run-dir", str(run_dir)).returncode == 0  # idempotent


def test_down_kills_what_ignores_sigterm_after_the_grace_period(tmp_path, stub):
    run_dir = tmp_path / "run"
    env = {"STUB_DIR": str(tmp_path / "calls"), "STUB_IGNORE_TERM": "1"}
    started = launcher(*up_args(run_dir, stub, "--workers", "1"), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    pids = [int(p.read_text().split()[0]) for p in (run_dir / "pids").glob("*.pid")]
    t0 = time.monotonic()
    stopped = launcher("down", "--run-dir", str(run_dir), "--grace", "1")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "SIGKILL" in stopped.stdout
    assert time.monotonic() - t0 < 20
    assert not any(alive(pid) for pid in pids)


def test_down_waits_for_the_children_of_a_process(tmp_path, stub):
    # The server exits at once on SIGTERM; its child needs 3 s. `down` reports "stopped" only
    # once the child is gone too.
    run_dir = tmp_path / "run"
    env = {"STUB_DIR": str(tmp_path / "calls"), "STUB_CHILD_LINGER": "3"}
    started = launcher(*up_args(run_dir, stub, "--workers", "1"), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    child = int((tmp_path / "calls" / "child.pid").read_text())
    assert alive(child)
    stopped = launcher("down", "--run-dir", str(run_dir), "--grace", "15")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "SIGKILL" not in stopped.stdout
    assert not alive(child)


def test_down_lets_the_server_drain_before_its_children_are_signalled(tmp_path, stub):
    # As Kubernetes does, `down` signals the server alone: a signal to its whole process group
    # would also reach vLLM's engine core, which stops at once and fails the requests the
    # server is still finishing. The rest of the group is signalled once the server is gone.
    run_dir = tmp_path / "run"
    env = {"STUB_DIR": str(tmp_path / "calls"), "STUB_CHILD_LINGER": "1", "STUB_DRAIN": "2"}
    started = launcher(*up_args(run_dir, stub, "--workers", "1"), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    child = int((tmp_path / "calls" / "child.pid").read_text())
    stopped = launcher("down", "--run-dir", str(run_dir), "--grace", "15")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "SIGKILL" not in stopped.stdout
    assert not alive(child)
    record = json.loads((tmp_path / "calls" / "child-sigterm.json").read_text())
    assert record == {"server_alive": False}


def test_down_kills_children_that_outlive_the_grace_period(tmp_path, stub):
    run_dir = tmp_path / "run"
    env = {"STUB_DIR": str(tmp_path / "calls"), "STUB_CHILD_LINGER": "60"}
    started = launcher(*up_args(run_dir, stub, "--workers", "1"), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    child = int((tmp_path / "calls" / "child.pid").read_text())
    stopped = launcher("down", "--run-dir", str(run_dir), "--grace", "1")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "server: still running after 1 s, SIGKILL" in stopped.stdout
    assert not alive(child)


def test_up_fails_cleanly_when_a_process_dies_at_start(tmp_path, stub):
    run_dir = tmp_path / "run"
    env = {"STUB_DIR": str(tmp_path / "calls"), "STUB_FAIL_ROLE": "worker"}
    result = launcher(*up_args(run_dir, stub), env=env)
    assert result.returncode == 1
    assert "exited during start-up" in result.stderr
    assert "failing on purpose" in result.stderr  # the log tail of the process that died
    state = json.loads((run_dir / "state.json").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in state["processes"].values()):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in state["processes"].values())
    assert not port_open(state["redis_port"])


def test_up_explains_a_missing_deliberate_command(tmp_path):
    env = {"PATH": "/nonexistent"}
    result = launcher("up", "--run-dir", str(tmp_path / "run"), env=env)
    assert result.returncode == 1
    assert "scripts/setup.sh" in result.stderr


def test_ports_picked_for_one_run_are_distinct():
    # Picked one socket at a time, the kernel may hand the same port out twice; a worker once
    # failed to start on a port already taken by its own run.
    free_ports = runpy.run_path(str(LAUNCHER), run_name="launcher")["free_ports"]
    ports = free_ports(64)
    assert len(set(ports)) == 64
