#!/usr/bin/env python3
"""Deliberate on one machine with the cluster's topology: separate processes for Redis, the
decoder server and N coprocessor workers.

  up      start redis-server, `deliberate serve` and N x `deliberate worker`; wait until all
          are ready; print where they listen. Processes keep running after `up` returns.
  down    stop them: SIGTERM (workers and server first, Redis last), SIGKILL after a grace
          period.
  status  show each process: pid, alive, ready.

Everything lives under the run directory (default runs/local):
  state.json          ports, URLs and commands of this run
  pids/<name>.pid     one per process: "<pid> <start time>" (the start time guards against a
                      recycled pid: `down` never signals a process that is not ours)
  logs/<name>.log     stdout and stderr of each process
  redis/              Redis' working directory (no persistence: --save "" --appendonly no)

Each process runs in its own session, so `down` can find and stop its children (vLLM's engine
core, for one). Only the standard library is used: run it with any Python 3.11.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_DIR = Path("runs/local")


# --- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    pid: int
    start_time: str  # /proc/<pid>/stat field 22: ticks since boot, stable for the pid's life


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19]  # field 22 overall


def _alive(proc: Proc) -> bool:
    """True while the pid is running and is still the process we started (not a reuse)."""
    start = _proc_start_time(proc.pid)
    if start is None or start != proc.start_time:
        return False
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pid_dir(run_dir: Path) -> Path:
    return run_dir / "pids"


def _write_pid(run_dir: Path, name: str, pid: int) -> Proc:
    start = _proc_start_time(pid) or "0"
    path = _pid_dir(run_dir) / f"{name}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {start}\n")
    return Proc(name, pid, start)


def read_procs(run_dir: Path) -> list[Proc]:
    procs = []
    pid_dir = _pid_dir(run_dir)
    if not pid_dir.is_dir():
        return procs
    for path in sorted(pid_dir.glob("*.pid")):
        try:
            pid_text, start = path.read_text().split()
            procs.append(Proc(path.stem, int(pid_text), start))
        except (OSError, ValueError):
            continue
    return procs


def _spawn(run_dir: Path, name: str, argv: list[str], env: dict[str, str]) -> Proc:
    log_path = run_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: `down` finds its children by it
            close_fds=True,
        )
    return _write_pid(run_dir, name, process.pid)


def _group_members(proc: Proc) -> list[Proc]:
    """The live processes of `proc`'s process group (it leads one: start_new_session), the
    leader included: e.g. vLLM's engine core and its workers under the server. Read while the
    leader is alive, so a recycled group id is never mistaken for ours."""
    if not _alive(proc):
        return []
    members = [proc]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == proc.pid:
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
        except (OSError, ValueError):
            continue
        if fields[2] == str(proc.pid) and fields[0] != "Z":  # field 5: process group
            members.append(Proc(proc.name, int(entry.name), fields[19]))
    return members


def _signal(proc: Proc, sig: signal.Signals) -> None:
    if not _alive(proc):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, sig)


def _reap(pid: int) -> None:
    # Children of this launcher (an `up` that failed) must be waited for, or they stay zombies.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_procs(procs: list[Proc], grace: float, out=sys.stdout) -> list[Proc]:
    """SIGTERM each process, then the rest of its process group once it is gone; SIGKILL
    what is left after `grace` seconds.

    Only the process itself gets the first SIGTERM, as Kubernetes does: the server drains its
    requests in progress on it, and a signal to the whole group would also reach vLLM's engine
    core, which stops at once and fails those requests. A process is stopped when its whole
    group is: the engine core outlives the server by a few seconds, and must not be left
    running (holding memory and threads) after `down` said "stopped". Returns the processes
    still alive after all that."""
    groups = {proc.name: _group_members(proc) for proc in procs}
    members = [member for group in groups.values() for member in group]
    for proc in procs:
        if _alive(proc):
            print(f"  {proc.name}: SIGTERM (pid {proc.pid})", file=out)
            _signal(proc, signal.SIGTERM)
    groups_signalled: set[str] = set()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for proc in procs:
            _reap(proc.pid)
            if proc.name not in groups_signalled and not _alive(proc):
                groups_signalled.add(proc.name)
                for member in groups[proc.name]:
                    _signal(member, signal.SIGTERM)
        if not any(_alive(p) for p in members):
            break
        time.sleep(0.1)
    for name, group in groups.items():
        left = [p for p in group if _alive(p)]
        if left:
            pids = ", ".join(str(p.pid) for p in left)
            print(f"  {name}: still running after {grace:.0f} s, SIGKILL (pids {pids})", file=out)
            for member in left:
                _signal(member, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in members):
        for proc in procs:
            _reap(proc.pid)
        time.sleep(0.05)
    return [p for p in members if _alive(p)]


# --- readiness -------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports. Every socket stays bound until all are picked: one at a
    time, the kernel may hand the same port out twice (a worker once failed to start on a
    port already taken by its own run)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(run_dir: Path, name: str, lines: int = 30) -> str:
    path = run_dir / "logs" / f"{name}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- commands --------------------------------------------------------------------------------


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def cmd_up(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    running = [p for p in read_procs(run_dir) if _alive(p)]
    if running:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in running)
        print(f"already running in {run_dir}: {names}; run `down` first", file=sys.stderr)
        return 1
    deliberate = args.deliberate or shutil.which("deliberate")
    if deliberate is None:
        print(
            "`deliberate` is not on PATH: use the environment scripts/setup.sh builds "
            '(PATH="$(scripts/setup.sh)/bin:$PATH") or pass --deliberate PATH',
            file=sys.stderr,
        )
        return 1
    deliberate_argv = deliberate.split()

    # A fresh run: old pid files and state go; logs are appended to.
    shutil.rmtree(_pid_dir(run_dir), ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **_parse_env(args.env)}

    # server, workers, redis
    auto_ports = iter(free_ports(args.workers + 2))
    server_port = args.server_port or next(auto_ports)
    worker_ports = [
        (args.worker_base_port + i) if args.worker_base_port else next(auto_ports)
        for i in range(args.workers)
    ]
    for port in [server_port, *worker_ports]:
        if _port_in_use(port):
            print(f"port {port} is already in use on 127.0.0.1", file=sys.stderr)
            return 1

    procs: list[Proc] = []
    # (name, readiness check)
    checks: list[tuple[str, object]] = []

    if args.redis_url:
        redis_url = args.redis_url
        redis_port = None
    else:
        binary = shutil.which("redis-server")
        if binary is None:
            print(
                "redis-server is not on PATH: apt-get install redis-server "
                "(scripts/setup.sh installs it when run as root), or pass --redis-url",
                file=sys.stderr,
            )
            return 1
        redis_port = args.redis_port or next(auto_ports)
        if _port_in_use(redis_port):
            print(f"port {redis_port} is already in use on 127.0.0.1", file=sys.stderr)
            return 1
        redis_dir = run_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        procs.append(
            _spawn(
                run_dir,
                "redis",
                [
                    binary,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(redis_dir),
                ],
                env,
            )
        )
        checks.append(("redis", lambda port=redis_port: redis_ping(port)))

    server_argv = [
        *deliberate_argv,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(server_port),
        "--redis-url",
        redis_url,
        *args.serve_arg,
    ]
    procs.append(_spawn(run_dir, "server", server_argv, env))
    server_url = f"http://127.0.0.1:{server_port}"
    checks.append(("server", lambda: http_ok(f"{server_url}/ready")))

    worker_urls = []
    for i, port in enumerate(worker_ports):
        name = f"worker-{i}"
        worker_env = {**env, "DELIBERATE_WORKER_METRICS_PORT": str(port)}
        worker_argv = [*deliberate_argv, "worker", "--redis-url", redis_url, *args.worker_arg]
        procs.append(_spawn(run_dir, name, worker_argv, worker_env))
        url = f"http://127.0.0.1:{port}"
        worker_urls.append(url)
        checks.append((name, lambda url=url: http_ok(f"{url}/ready")))

    state = {
        "redis_url": redis_url,
        "redis_port": redis_port,
        "server_url": server_url,
        "api_base": f"{server_url}/v1",
        "worker_urls": worker_urls,
        "processes": {p.name: p.pid for p in procs},
        "started": time.time(),
    }
    (run_dir / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    print(f"starting in {run_dir}: " + ", ".join(f"{p.name} (pid {p.pid})" for p in procs))
    by_name = {p.name: p for p in procs}
    pending = dict(checks)
    started = time.monotonic()
    failed: str | None = None
    try:
        while pending:
            for name, check in list(pending.items()):
                if not _alive(by_name[name]):
                    _reap(by_name[name].pid)
                    failed = name
                    raise RuntimeError(f"{name} exited during start-up")
                if check():  # type: ignore[operator]
                    print(f"  {name}: ready after {time.monotonic() - started:.0f} s", flush=True)
                    del pending[name]
            if pending and time.monotonic() - started > args.ready_timeout:
                failed = next(iter(pending))
                raise RuntimeError(
                    f"not ready after {args.ready_timeout:.0f} s: {', '.join(pending)}"
                )
            time.sleep(0.5)
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"start-up failed: {exc or 'interrupted'}", file=sys.stderr)
        if failed:
            print(f"--- last lines of {run_dir / 'logs' / (failed + '.log')}:", file=sys.stderr)
            print(_log_tail(run_dir, failed), file=sys.stderr)
        print("stopping what was started", file=sys.stderr)
        stop_procs(_stop_order(procs), args.grace, out=sys.stderr)
        return 1

    print(f"ready. API: {state['api_base']} (OpenAI-compatible)")
    print(f"  server metrics: {server_url}/metrics")
    for i, url in enumerate(worker_urls):
        print(f"  worker-{i} metrics: {url}/metrics")
    print(f"  redis: {redis_url}")
    print(f"  logs: {run_dir / 'logs'}")
    print(f"stop with: {Path(__file__).parent / 'down.sh'} --run-dir {run_dir}")
    return 0


def _stop_order(procs: list[Proc]) -> list[Proc]:
    # Workers and the server first (a worker releases its batch on SIGTERM, which needs Redis),
    # Redis last.
    return [p for p in procs if p.name != "redis"] + [p for p in procs if p.name == "redis"]


def cmd_down(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    procs = read_procs(run_dir)
    if not procs:
        print(f"nothing to stop in {run_dir}")
        return 0
    apps = [p for p in procs if p.name != "redis"]
    redis = [p for p in procs if p.name == "redis"]
    print(f"stopping {run_dir}")
    left = stop_procs(apps, args.grace)
    left += stop_procs(redis, args.grace)
    if left:
        print(
            "could not stop: " + ", ".join(f"{p.name} (pid {p.pid})" for p in left), file=sys.stderr
        )
        return 1
    shutil.rmtree(_pid_dir(run_dir), ignore_errors=True)
    print("stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    procs = read_procs(run_dir)
    if not procs:
        print(f"nothing running in {run_dir}")
        return 3
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    urls = {"server": state.get("server_url")}
    for i, url in enumerate(state.get("worker_urls", [])):
        urls[f"worker-{i}"] = url
    all_ok = True
    for proc in procs:
        alive = _alive(proc)
        if proc.name == "redis":
            ready = alive and redis_ping(state.get("redis_port") or 0)
        else:
            url = urls.get(proc.name)
            ready = alive and bool(url) and http_ok(f"{url}/ready")
        all_ok &= ready
        print(
            f"{proc.name:10} pid {proc.pid:<8} {'alive' if alive else 'dead':6} "
            f"{'ready' if ready else 'not ready'}"
        )
    return 0 if all_ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploy/local/launcher.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--run-dir",
            type=Path,
            default=DEFAULT_RUN_DIR,
            help=f"where pid files, logs and state live (default: {DEFAULT_RUN_DIR})",
        )
        p.add_argument(
            "--grace",
            type=float,
            default=30.0,
            help="seconds between SIGTERM and SIGKILL when stopping (default: 30)",
        )

    up = sub.add_parser("up", help="start Redis, the server and the workers; wait until ready")
    common(up)
    up.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    up.add_argument(
        "--server-port",
        type=int,
        default=8000,
        help="the server's port (default: 8000; 0 picks a free one)",
    )
    up.add_argument(
        "--worker-base-port",
        type=int,
        default=9100,
        help="worker i listens on this + i (default: 9100; 0 picks free ones)",
    )
    up.add_argument(
        "--redis-port",
        type=int,
        default=0,
        help="port of the redis-server started here (default: a free one)",
    )
    up.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting one (any URL the store takes)",
    )
    up.add_argument(
        "--deliberate", default=None, help="the deliberate command (default: `deliberate` on PATH)"
    )
    up.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the server and workers, e.g. "
        "DELIBERATE_ENFORCE_EAGER=true (repeatable)",
    )
    up.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `deliberate serve` (repeatable)",
    )
    up.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `deliberate worker` (repeatable)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for everything to be ready (default: 600; the "
        "decoder compiles for 20-100 s on a CPU)",
    )
    up.set_defaults(run=cmd_up)

    down = sub.add_parser("down", help="stop everything `up` started in the run directory")
    common(down)
    down.set_defaults(run=cmd_down)

    status = sub.add_parser("status", help="show the processes of the run directory")
    common(status)
    status.set_defaults(run=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
