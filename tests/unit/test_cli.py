"""The `scalellm` command line: role dispatch and `up` options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services import cli

REPO = Path(__file__).resolve().parents[2]


def test_a_role_runs_its_package_main_like_python_dash_m(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    package = tmp_path / "fake_role"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import sys\nif __name__ == '__main__':\n    sys.modules['fake_role'].ran_as_main = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.ROLES, "tokenizer", "fake_role")
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_module rewrites argv[0]
    try:
        cli.main(["tokenizer"])
        assert getattr(sys.modules["fake_role"], "ran_as_main", False)
    finally:
        sys.modules.pop("fake_role", None)
        sys.modules.pop("fake_role.__main__", None)


def test_every_role_has_a_main_module() -> None:
    import importlib.util

    for role, package in cli.ROLES.items():
        assert package == f"services.{role}"
        assert importlib.util.find_spec(f"{package}.__main__") is not None, role


def test_a_missing_role_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.ROLES, "detokenizer", "services.no_such_package")
    with pytest.raises(SystemExit, match="scalellm detokenizer: services.no_such_package has no __main__"):
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


@pytest.mark.parametrize(
    "argv", [["up", "--engines", "0"], ["up", "--port", "70000"], ["up", "--backend", "vllm"], ["serve"]]
)
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
