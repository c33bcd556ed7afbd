"""A serving benchmark client for any OpenAI-compatible server, after `vllm bench serve`.

    python -m bench.serve --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \
        --num-prompts 128 --input-len 128 --output-len 128 --max-concurrency 64

Prompts are random token ids sent as a token list to /v1/completions (exact
input length, no tokenizer needed here; vLLM and llama.cpp accept token-list
prompts too), or with --prompt-format text, random words. Every request
streams, asks for exactly --output-len tokens (ignore_eos), and the client
records time to first token (TTFT), time per output token after the first
(TPOT) and the gaps between streamed chunks (ITL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def random_prompts(count: int, input_len: int, vocab_size: int, prompt_format: str, seed: int) -> list[str | list[int]]:
    rng = random.Random(seed)
    if prompt_format == "ids":
        # Skip the lowest ids: in most vocabularies they are special tokens.
        return [[rng.randrange(100, vocab_size) for _ in range(input_len)] for _ in range(count)]
    words = ["the", "of", "river", "model", "token", "serve", "quick", "light", "data", "stream"]
    return [" ".join(rng.choice(words) for _ in range(input_len)) for _ in range(count)]


async def one_request(
    client: httpx.AsyncClient, model: str, prompt: str | list[int], output_len: int, input_len: int
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "min_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(ok=False, prompt_tokens=input_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                if not event.get("choices") or not event["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                chunks += 1
    except httpx.HTTPError as exc:
        result.error = repr(exc)
        return result
    result.latency_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = True
    return result


async def run(args: argparse.Namespace) -> dict[str, float]:
    prompts = random_prompts(args.num_prompts, args.input_len, args.vocab_size, args.prompt_format, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=limits, headers=headers) as client:
        if args.warmup:
            await one_request(client, args.model, prompts[0], 4, args.input_len)

        async def limited(prompt: str | list[int]) -> RequestResult:
            async with limit:
                return await one_request(client, args.model, prompt, args.output_len, args.input_len)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(random.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration)


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    summary: dict[str, float] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": sum(r.output_tokens for r in ok) / duration,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in ok) / duration,
    }
    series = {
        "ttft_ms": [r.ttft_s * 1000 for r in ok],
        "tpot_ms": [r.tpot_s * 1000 for r in ok if r.tpot_s is not None],
        "itl_ms": [gap * 1000 for r in ok for gap in r.itl_s],
    }
    for name, values in series.items():
        if values:
            values.sort()
            summary[f"mean_{name}"] = statistics.fmean(values)
            summary[f"median_{name}"] = statistics.median(values)
            summary[f"p99_{name}"] = values[min(len(values) - 1, int(len(values) * 0.99))]
    for r in results:
        if not r.ok:
            print(f"failed request: {r.error}")
            break
    return summary


def print_summary(summary: dict[str, float]) -> None:
    print("=" * 50)
    for key, value in summary.items():
        print(f"{key:<28} {value:>14.2f}")
    print("=" * 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once"
    )
    parser.add_argument("--prompt-format", choices=["ids", "text"], default="ids")
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)


if __name__ == "__main__":
    main()
