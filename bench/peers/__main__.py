"""``python -m bench.peers install|run|roofline`` (see bench/peers/__init__.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_WORK = "~/.cache/scalellm/peers"


def _names(text: str) -> list[str]:
    from bench.peers.run import ALL_PEERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {unknown[0]!r}; choose from {','.join(ALL_PEERS)}")
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies are positive: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install the peers under --work-dir")
    inst.add_argument("--peers", type=_names, default=["vllm", "llamacpp", "transformers"])
    inst.add_argument("--work-dir", default=DEFAULT_WORK)
    inst.add_argument("--torch-index", default="", help="an extra index with the CPU torch wheel, e.g. "
                      "https://download.pytorch.org/whl/cpu (default: pip's own configuration)")  # fmt: skip
    run = sub.add_parser("run", help="the roofline, then each server in turn under the same load")
    run.add_argument("--peers", type=_names, default=["ours", "vllm", "llamacpp", "transformers"])
    run.add_argument("--concurrency", type=_ints, default=[1, 64])
    run.add_argument("--input-len", type=int, default=128)
    run.add_argument("--output-len", type=int, default=128)
    run.add_argument("--work-dir", default=DEFAULT_WORK)
    run.add_argument("--out", default="", help="results folder (default: <work-dir>/results/<UTC time>)")
    run.add_argument("--ours-env", action="append", metavar="'A=1 B=2'",
                     help="environment of one configuration of ours; repeat for several ('' = as installed)")  # fmt: skip
    run.add_argument("--vllm-env", action="append", default=[], metavar="A=1", help="more environment for vLLM")
    run.add_argument("--our-client", action="store_true", help="load with scalellm bench even where vLLM's exists")
    run.add_argument("--quick", action="store_true", help="a smoke run: few requests, 32 tokens out, small roofline")
    sub.add_parser("roofline", help="measure the roofline only (python -m bench.peers.roofline has options)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "install":
        from bench.peers.install import install

        install(args.peers, Path(args.work_dir).expanduser(), args.torch_index)
    elif args.command == "run":
        from bench.peers.run import run

        args.argv = argv
        run(args)
    else:
        from bench.peers.roofline import main as roofline_main

        sys.argv = [sys.argv[0]]
        roofline_main()


if __name__ == "__main__":
    main()
