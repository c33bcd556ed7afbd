"""The ``scalellm`` command.

``scalellm gateway|tokenizer|engine|detokenizer`` runs one role exactly as
``python -m services.<role>`` does: it runs that package's ``__main__``
(settings come from SCALELLM_* variables). ``scalellm up`` runs the whole
pipeline locally; ``scalellm health ROLE`` checks this host's replica of ROLE
(container health checks); ``scalellm bench`` benchmarks any OpenAI-compatible
server (bench/serving/, which parses its own options). Roles are imported only
when chosen, so e.g. the gateway never loads torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from collections.abc import Sequence

# role -> the package whose __main__ runs it.
ROLES: dict[str, str] = {
    "gateway": "services.gateway",
    "tokenizer": "services.tokenizer",
    "engine": "services.engine",
    "detokenizer": "services.detokenizer",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalellm",
        description="An LLM serving pipeline: gateway, tokenizer, engine and detokenizer over Redis streams.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser("up", help="start the whole pipeline on this machine (and Redis if none is configured)")
    # Imported here, not at the top: the role commands should not pay for it.
    from services.launcher.up import add_arguments

    add_arguments(up)
    health = commands.add_parser("health", help="exit 0 if this host's replica of a role is alive (its heartbeat)")
    health.add_argument("role", choices=list(ROLES), help="the role of the replica running on this host")
    # Listed here for --help; its options are bench.serving.cli's own (main hands it the rest of argv).
    commands.add_parser(
        "bench", add_help=False, help="benchmark an OpenAI-compatible server (scalellm bench --help; bench plot)"
    )
    for role in ROLES:
        commands.add_parser(role, help=f"run one {role} replica (settings from SCALELLM_* variables)")
    return parser


def run_role(role: str) -> None:
    """``python -m services.<role>``, in this process."""
    package = ROLES[role]
    try:
        found = importlib.util.find_spec(f"{package}.__main__") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise SystemExit(f"scalellm {role}: {package} has no __main__ module to run")
    runpy.run_module(package, run_name="__main__", alter_sys=True)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from bench.serving.cli import main as bench

        sys.exit(bench(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.command == "up":
        from services.launcher.up import run

        try:
            code = run(args)
        except KeyboardInterrupt:
            code = 130
        sys.exit(code)
    if args.command == "health":
        from services.launcher.health import run as check_health

        sys.exit(check_health(args))
    run_role(args.command)


if __name__ == "__main__":
    main()
