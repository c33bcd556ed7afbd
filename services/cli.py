"""The ``scalellm`` command.

``scalellm gateway|tokenizer|engine|detokenizer`` runs one role, exactly as
``python -m services.<role>`` does (settings come from SCALELLM_* variables);
``scalellm up`` runs the whole pipeline locally. Roles are imported only when
chosen, so e.g. the gateway never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

# role -> (module, function): the role's own entry point.
ROLES: dict[str, tuple[str, str]] = {
    "gateway": ("services.gateway.server", "main"),
    "tokenizer": ("services.tokenizer.service", "main"),
    "engine": ("services.engine.service", "main"),
    "detokenizer": ("services.detokenizer.service", "main"),
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
    for role in ROLES:
        commands.add_parser(role, help=f"run one {role} replica (settings from SCALELLM_* variables)")
    return parser


def role_entry_point(role: str) -> Callable[[], object]:
    module_name, function = ROLES[role]
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SystemExit(f"scalellm {role}: cannot import {module_name} ({exc})") from None
    entry = getattr(module, function, None)
    if not callable(entry):
        raise SystemExit(f"scalellm {role}: {module_name} has no {function}() entry point")
    return entry


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        from services.launcher.up import run

        try:
            code = run(args)
        except KeyboardInterrupt:
            code = 130
        sys.exit(code)
    role_entry_point(args.command)()


if __name__ == "__main__":
    main()
