"""The `scalellm` command line: role dispatch and `up` options."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from services import cli

REPO = Path(__file__).resolve().parents[2]


def test_each_role_runs_its_own_main(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake = types.ModuleType("fake_role_module")
    fake.main = lambda: calls.append("tokenizer main")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_role_module", fake)
    monkeypatch.setitem(cli.ROLES, "tokenizer", ("fake_role_module", "main"))
    cli.main(["tokenizer"])
    assert calls == ["tokenizer main"]


def test_roles_point_at_the_documented_entry_points() -> None:
    assert cli.ROLES == {
        "gateway": ("services.gateway.server", "main"),
        "tokenizer": ("services.tokenizer.service", "main"),
        "engine": ("services.engine.service", "main"),
        "detokenizer": ("services.detokenizer.service", "main"),
    }


def test_a_missing_role_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.ROLES, "detokenizer", ("services.no_such_module", "main"))
    with pytest.raises(SystemExit, match="scalellm detokenizer: cannot import services.no_such_module"):
        cli.main(["detokenizer"])


def test_up_options_parse_and_defaults_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.launcher.up import resolve_defaults

    args = cli.build_parser().parse_args(["up", "--port", "9001", "--tokenizers", "3", "--backend", "hf"])
    assert (args.command, args.port, args.tokenizers, args.engines, args.detokenizers, args.backend) == (
        "up", 9001, 3, 1, 1, "hf",
    )  # fmt: skip
    monkeypatch.setenv("SCALELLM_GATEWAY_HOST", "0.0.0.0")
    monkeypatch.setenv("SCALELLM_ENGINE_BACKEND", "torch")
    resolve_defaults(args)
    assert (args.host, args.port, args.backend) == ("0.0.0.0", 9001, "hf")  # the command line wins
    defaults = cli.build_parser().parse_args(["up"])
    resolve_defaults(defaults)
    assert (defaults.host, defaults.backend) == ("0.0.0.0", "torch")


@pytest.mark.parametrize("argv", [["up", "--engines", "0"], ["up", "--port", "70000"], ["up", "--backend", "vllm"], ["serve"]])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_engine_role_needs_a_redis_url() -> None:
    env = {"PATH": "/usr/bin:/bin", "SCALELLM_ENGINE_BACKEND": "echo"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "engine"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "SCALELLM_REDIS_URL is not set" in result.stderr
