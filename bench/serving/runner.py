"""One benchmark run, or a sweep of runs over concurrency limits, against one server.

A run sends each request at its arrival time (arrivals.py); at most ``max_concurrency``
are in flight (more wait for a slot, and their clock starts when they are sent). Warm-up
requests go first, once, and are not counted. Each run of a sweep draws its prompts with
its own seed (seed + its index), so a prefix cache does not serve a later run the prompts
of an earlier one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from bench.serving import server_metrics
from bench.serving.arrivals import ArrivalProcess
from bench.serving.client import Endpoint, first_model, send_request
from bench.serving.datasets import Dataset, RequestSpec
from bench.serving.metrics import RequestResult, compute_metrics, error_key, resolve_output_tokens
from bench.serving.progress import Progress

WARMUP_SEED_OFFSET = 1_000_003  # warm-up prompts are not any run's prompts
WARMUP_MAX_OUTPUT = 16


@dataclass
class BenchConfig:
    base_url: str
    endpoint: Endpoint  # model "" = the first that GET /v1/models lists
    num_prompts: int
    concurrencies: Sequence[int | None] = (None,)  # one run per value; None: no limit
    arrivals: ArrivalProcess = field(default_factory=ArrivalProcess)
    num_warmups: int = 1
    seed: int = 0
    percentiles: Sequence[float] = (99,)
    api_key: str | None = None
    request_timeout_s: float | None = 600.0
    progress: bool = True
    server_metrics: bool = True  # read /metrics before and after each run
    transport: httpx.AsyncBaseTransport | None = None  # tests: an in-process server


@dataclass
class RunResult:
    max_concurrency: int | None
    metrics: dict[str, Any]
    server_metrics: list[dict[str, Any]] | None
    requests: list[RequestResult]


async def send_all(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    specs: Sequence[RequestSpec],
    send_times: Sequence[float],
    max_concurrency: int | None,
    on_done: Callable[[RequestResult], None] = lambda _: None,
) -> tuple[list[RequestResult], float]:
    """Every request at its time, at most max_concurrency at once; the results and the run's duration."""
    if len(send_times) != len(specs):
        raise ValueError("one send time per request")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(spec: RequestSpec) -> RequestResult:
        if slots is None:
            result = await send_request(client, endpoint, spec, time.perf_counter() - start)
        else:
            async with slots:
                result = await send_request(client, endpoint, spec, time.perf_counter() - start)
        on_done(result)
        return result

    tasks = []
    for spec, at in zip(specs, send_times):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def http_client(config: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    return httpx.AsyncClient(
        base_url=config.base_url,
        headers=headers,
        timeout=httpx.Timeout(config.request_timeout_s, connect=min(30.0, config.request_timeout_s or 30.0)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        transport=config.transport,
    )


async def warm_up(client: httpx.AsyncClient, config: BenchConfig, dataset: Dataset, log: TextIO) -> list[RequestResult]:
    """num_warmups short requests of the dataset's shape (at most WARMUP_MAX_OUTPUT tokens out), not counted."""
    specs = [
        dataclasses.replace(s, output_len=min(s.output_len, WARMUP_MAX_OUTPUT))
        for s in dataset.generate(config.num_warmups, config.seed + WARMUP_SEED_OFFSET)
    ]
    limit = next((c for c in config.concurrencies if c), None)
    results, _ = await send_all(client, config.endpoint, specs, [0.0] * len(specs), limit)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"warm-up: {len(failed)} of {len(results)} requests failed: {error_key(failed[0].error)}", file=log)
    return results


async def run_benchmark(
    config: BenchConfig,
    dataset: Dataset,
    count_tokens: Callable[[str], int] | None = None,
    log: TextIO = sys.stderr,
    on_run: Callable[[RunResult], None] = lambda _: None,
) -> tuple[Endpoint, list[RunResult]]:
    """The warm-up, then one run per concurrency limit; the endpoint (with the model resolved) and the runs."""
    runs: list[RunResult] = []
    async with http_client(config) as client:
        endpoint = config.endpoint
        if not endpoint.model:
            endpoint = dataclasses.replace(endpoint, model=await first_model(client))
            config = dataclasses.replace(config, endpoint=endpoint)
        # Every run's prompts first: building them can take seconds (exact-length chats), during
        # which the warm-up's keep-alive connections would idle past the server's timeout (5 s in
        # uvicorn) and the first request on one of them could meet the server closing it.
        all_specs = [dataset.generate(config.num_prompts, config.seed + i) for i in range(len(config.concurrencies))]
        if config.num_warmups > 0:
            await warm_up(client, config, dataset, log)
        for index, limit in enumerate(config.concurrencies):
            seed = config.seed + index
            specs = all_specs[index]
            send_times = config.arrivals.send_times(len(specs), seed)
            label = "requests" if limit is None else f"concurrency {limit}"
            progress = Progress(len(specs), label, enabled=config.progress, stream=log)
            before = await server_metrics.scrape(client) if config.server_metrics else None
            try:
                results, duration = await send_all(
                    client, endpoint, specs, send_times, limit, lambda r: progress.update(r.ok)
                )
            finally:
                progress.close()
            after = await server_metrics.scrape(client) if before is not None else None
            resolve_output_tokens(results, count_tokens)
            run = RunResult(
                max_concurrency=limit,
                metrics=compute_metrics(results, duration, config.percentiles),
                server_metrics=server_metrics.stage_breakdown(before, after),
                requests=results,
            )
            runs.append(run)
            on_run(run)
    return endpoint, runs


def parse_concurrencies(text: str) -> list[int]:
    """Parses "1,4,16,64" to [1, 4, 16, 64]; every value a positive integer."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"concurrency values are positive integers, not {part!r}")
        values.append(int(part))
    if not values:
        raise ValueError("no concurrency values")
    return values


def parse_rate(text: str) -> float:
    rate = float(text)
    if math.isnan(rate) or rate <= 0:
        raise ValueError(f"the request rate must be positive or inf, not {text}")
    return rate
