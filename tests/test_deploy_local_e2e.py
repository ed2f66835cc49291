"""deploy/local end to end: the real one command (`deploy/local/up.sh`) starts its own
redis-server, the real `deliberate serve` (vLLM) and two real `deliberate worker` processes;
the official openai client drives it; a worker is killed with SIGKILL while it holds jobs,
and every job still completes; `deploy/local/down.sh` stops everything.

One deployment for the whole module (vLLM takes 30-90 s to start on a CPU); the tests run in
file order and share it. The coprocessor is an untrained but real checkpoint for the bundled
decoder (tests/fixtures/models.py), applied with DELIBERATE_ALLOW_UNVALIDATED_COPROCESSOR.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import redis

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "deploy" / "local" / "up.sh"
DOWN = REPO / "deploy" / "local" / "down.sh"
LAUNCHER = REPO / "deploy" / "local" / "launcher.py"

API_KEY = "e2e-key"
N_LATENTS = 4
VISIBILITY_TIMEOUT_S = 5
CONTEXTS_PER_ROUND = 12

JOBS = "deliberate:jobs"
DEAD = "deliberate:jobs:dead"
GROUP = "deliberate-workers"

TOWNS = [
    "Aberkell", "Penrhos", "Llanfair", "Castell", "Brynmawr", "Tregaron", "Glanrhyd",
    "Cwmafon", "Pentre", "Rhosgoch", "Dolwen", "Maesteg", "Caerwen", "Hafod", "Nantlle",
    "Porthdu", "Talybont", "Ystrad", "Bethel", "Garndolbenmaen", "Llanwrst", "Ffestiniog",
    "Beddgelert", "Corris",
]  # fmt: skip


def context(i: int) -> str:
    """A distinct reusable context of ~60 tokens (above min_context_tokens)."""
    town = TOWNS[i % len(TOWNS)]
    return (
        f"Record {i}. The {town} branch railway opened in {1850 + 3 * i} to carry slate from "
        f"the quarries above {town} down to the harbour, {7 + i} miles away. It ran {2 + i % 4} "
        f"trains a day until the last quarry closed in {1925 + i}, and its track bed is now a "
        "footpath that follows the river to the sea.\n\n"
    )


@dataclass
class Deployment:
    run_dir: Path
    env: dict[str, str]
    state: dict
    pids: dict[str, int]
    pgids: set[int] = field(default_factory=set)
    down: subprocess.CompletedProcess | None = None

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.state["redis_url"])

    @property
    def ports(self) -> list[int]:
        urls = [self.state["server_url"], *self.state["worker_urls"]]
        return [self.state["redis_port"], *(int(u.rsplit(":", 1)[1]) for u in urls)]


def _pgid_members(pgids: set[int]) -> list[int]:
    """Live processes in these process groups (the launcher starts each in its own session,
    so a group is a process and all its children, e.g. vLLM's engine core)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = rest[0], int(rest[2])
        if pgrp in pgids and state != "Z":
            members.append(int(entry.name))
    return members


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_down(run_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DOWN), "--run-dir", str(run_dir), "--grace", "60"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, bundled_decoder: Path, untrained_checkpoint: Path
) -> Iterator[Deployment]:
    run_dir = tmp_path_factory.mktemp("deploy-local") / "run"
    env = {
        **os.environ,
        # `deliberate` of this interpreter's environment, running this checkout's code (an
        # editable install elsewhere would otherwise win).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
    }
    settings = {
        "DELIBERATE_MODEL": str(bundled_decoder),
        "DELIBERATE_COPROCESSOR": str(untrained_checkpoint),
        "DELIBERATE_ALLOW_UNVALIDATED_COPROCESSOR": "true",
        "DELIBERATE_VALUE_CHECK": "false",  # these tests are about the topology, not the check
        "DELIBERATE_API_KEYS": API_KEY,
        "DELIBERATE_ENFORCE_EAGER": "true",
        "DELIBERATE_MAX_MODEL_LEN": "2048",
        "DELIBERATE_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT_S),
        # Small batches: a batch must finish well within the visibility timeout on a shared
        # 2-core machine, or a busy worker's jobs are reclaimed (harmless, but wasted).
        "DELIBERATE_WORKER_BATCH_MAX_JOBS": "2",
        "DELIBERATE_TORCH_THREADS": "1",
        "DELIBERATE_LOOKUP_TIMEOUT_SECONDS": "0.25",  # generous: the machine is noisy
    }
    command = [
        str(UP), "--run-dir", str(run_dir), "--server-port", "0", "--worker-base-port", "0",
        "--ready-timeout", "420",
    ]  # fmt: skip
    for key, value in settings.items():
        command += ["--env", f"{key}={value}"]
    up = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if up.returncode != 0:
        _run_down(run_dir, env)
        pytest.fail(f"up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    state = json.loads((run_dir / "state.json").read_text())
    pids = {p.stem: int(p.read_text().split()[0]) for p in (run_dir / "pids").glob("*.pid")}
    deployment = Deployment(run_dir, env, state, pids, pgids=set(pids.values()))
    try:
        yield deployment
    finally:
        if deployment.down is None:
            _run_down(run_dir, env)


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=deployment.state["api_base"], api_key=API_KEY, max_retries=0, timeout=180
    )


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _complete(client: openai.OpenAI, model: str, ctx: str) -> tuple[dict, str | None]:
    """One completion with a reusable context: (its augmentation field, the header)."""
    raw = client.completions.with_raw_response.create(
        model=model,
        prompt="Question: when did the railway close?\nAnswer:",
        max_tokens=4,
        temperature=0,
        extra_body={"context": ctx},
    )
    completion = raw.parse()  # the openai client's own parsing accepts the response
    assert completion.choices[0].text is not None
    body = raw.http_response.json()
    return body["augmentation"], raw.headers.get("X-Deliberate-Augmentation")


def _complete_all(client: openai.OpenAI, model: str, contexts: list[str]) -> list[dict]:
    """Concurrently, as many clients would: vLLM batches them, and the jobs arrive together."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda c: _complete(client, model, c), contexts))
    augmentations = []
    for augmentation, header in results:
        assert header == augmentation["status"]
        augmentations.append(augmentation)
    return augmentations


def _key_status(deployment: Deployment, key: str) -> dict:
    response = httpx.get(
        f"{deployment.state['api_base']}/augmentations/{key}",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def _wait_all_ready(deployment: Deployment, keys: list[str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    states: dict[str, dict] = {}
    while time.monotonic() < deadline:
        states = {key: _key_status(deployment, key) for key in keys}
        if all(s["state"] == "ready" for s in states.values()):
            return states
        assert not [s for s in states.values() if s["state"] == "failed"], states
        time.sleep(1)
    waiting = {k: s["state"] for k, s in states.items() if s["state"] != "ready"}
    logs = "\n".join(
        f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
        for p in sorted((deployment.run_dir / "logs").glob("*.log"))
    )
    raise AssertionError(f"not ready after {timeout_s} s: {waiting}\n{logs}")


def _assert_queue_drained(deployment: Deployment) -> None:
    r = deployment.redis
    assert r.xlen(DEAD) == 0, r.xrange(DEAD)  # nothing dead-lettered
    assert r.xlen(JOBS) == 0  # acked entries are deleted: nothing outstanding
    assert r.xpending(JOBS, GROUP)["pending"] == 0  # nothing held by anyone


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_up_started_redis_server_and_two_workers(deployment: Deployment, model: str) -> None:
    assert set(deployment.pids) == {"redis", "server", "worker-0", "worker-1"}
    state = deployment.state
    assert state["redis_url"].startswith("redis://127.0.0.1:")
    assert state["redis_port"] != 6379  # its own Redis, never the machine's shared one
    assert deployment.redis.ping()
    # Separate processes with their own ports.
    assert len(set(deployment.ports)) == 4
    assert len(set(deployment.pids.values())) == 4
    status = subprocess.run(
        [sys.executable, str(LAUNCHER), "status", "--run-dir", str(deployment.run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert model  # the API answers with the bundled decoder
    for url in [state["server_url"], *state["worker_urls"]]:
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200, url
    # Redis was started by `up` for this deployment: a consumer group exists once a worker
    # has asked for jobs.
    assert deployment.redis.xinfo_groups(JOBS)[0]["name"].decode() == GROUP


def test_distinct_contexts_miss_then_all_become_hits(
    deployment: Deployment, client: openai.OpenAI, model: str
) -> None:
    contexts = [context(i) for i in range(CONTEXTS_PER_ROUND)]
    first = _complete_all(client, model, contexts)
    assert [a["status"] for a in first] == ["miss-enqueued"] * len(contexts), first
    keys = [a["key"] for a in first]
    assert len(set(keys)) == len(contexts)  # distinct contexts, distinct keys
    assert all(a["n_latents"] == 0 for a in first)  # latents applied: none yet

    _wait_all_ready(deployment, keys, timeout_s=240)
    _assert_queue_drained(deployment)

    again = _complete_all(client, model, contexts)
    assert [a["status"] for a in again] == ["hit"] * len(contexts), again
    assert [a["key"] for a in again] == keys
    assert all(a["n_latents"] == N_LATENTS for a in again)
    # Both workers took part.
    for url in deployment.state["worker_urls"]:
        assert _metric(url, 'deliberate_worker_jobs_total{outcome="done"}') >= 1


def test_worker_killed_mid_run_loses_no_job(
    deployment: Deployment, client: openai.OpenAI, model: str
) -> None:
    r = deployment.redis
    victim_pid = deployment.pids["worker-0"]
    victim = f"{socket.gethostname()}-{victim_pid}"  # the worker's default consumer name

    offset = CONTEXTS_PER_ROUND
    contexts = [context(offset + i) for i in range(CONTEXTS_PER_ROUND)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        # The requests go on while worker-0 dies: the server answers them all regardless.
        futures = [pool.submit(_complete, client, model, c) for c in contexts]
        # Kill worker-0 the moment it holds jobs (delivered to it, not yet acknowledged).
        held: list[dict] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not held:
            held = r.xpending_range(JOBS, GROUP, min="-", max="+", count=100, consumername=victim)
            if not held:
                time.sleep(0.02)
        assert held, "worker-0 never took a job"
        os.killpg(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        held_keys = []  # its jobs in flight: still outstanding, no result yet
        for entry in held:
            entries = r.xrange(JOBS, min=entry["message_id"], max=entry["message_id"])
            if entries:
                key = json.loads(entries[0][1][b"job"])["key"]
                if _key_status(deployment, key)["state"] == "pending":
                    held_keys.append(key)
        assert held_keys, "worker-0 finished its jobs before the kill; nothing was in flight"
        results = [future.result() for future in futures]

    first = []
    for augmentation, header in results:
        assert header == augmentation["status"]
        first.append(augmentation)
    assert [a["status"] for a in first] == ["miss-enqueued"] * len(contexts), first
    keys = [a["key"] for a in first]
    assert len(set(keys)) == len(contexts)
    assert set(held_keys) <= set(keys)

    states = _wait_all_ready(deployment, keys, timeout_s=300)
    # worker-0's jobs waited out the visibility timeout and worker-1 took them over.
    assert time.monotonic() - killed_at >= VISIBILITY_TIMEOUT_S
    for key in held_keys:
        assert states[key]["attempts"] >= 2, states[key]
    _assert_queue_drained(deployment)
    worker_1 = deployment.state["worker_urls"][1]
    assert _metric(worker_1, "deliberate_store_reclaimed_total") >= len(held_keys)

    again = _complete_all(client, model, contexts)
    assert [a["status"] for a in again] == ["hit"] * len(contexts), again

    status = subprocess.run(
        [sys.executable, str(LAUNCHER), "status", "--run-dir", str(deployment.run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1  # worker-0 is gone, and status says so
    assert "worker-0" in status.stdout and "dead" in status.stdout


def test_down_stops_every_process_and_frees_every_port(deployment: Deployment) -> None:
    assert _pgid_members(deployment.pgids)  # the server, worker-1, Redis (and vLLM's engine)
    started = time.monotonic()
    deployment.down = _run_down(deployment.run_dir, deployment.env)
    took = time.monotonic() - started
    output = deployment.down.stdout + deployment.down.stderr
    assert deployment.down.returncode == 0, output
    assert "SIGKILL" not in output  # every process stopped on SIGTERM within the grace
    assert "stopped" in deployment.down.stdout
    # Gone when `down` returns, children included (vLLM's engine core outlives the server by
    # a few seconds on its own).
    assert _pgid_members(deployment.pgids) == [], "processes left behind"
    assert [p for p in deployment.ports if _port_open(p)] == []
    assert not (deployment.run_dir / "pids").exists()
    assert took < 60, f"down took {took:.0f} s"
