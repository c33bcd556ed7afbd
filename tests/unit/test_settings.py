"""Settings: read from SCALELLM_* variables, and a bad value stops start-up naming the setting."""

from __future__ import annotations

from typing import get_args

import pytest

from shared.settings import EngineSettings, load_settings


def test_kernel_settings_default_and_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALELLM_KERNELS", raising=False)
    monkeypatch.delenv("SCALELLM_KERNEL_CACHE_DIR", raising=False)
    settings = load_settings(EngineSettings)
    assert (settings.kernels, settings.kernel_cache_dir) == ("auto", None)
    monkeypatch.setenv("SCALELLM_KERNELS", "torch")
    monkeypatch.setenv("SCALELLM_KERNEL_CACHE_DIR", "/tmp/kernels")
    settings = load_settings(EngineSettings)
    assert (settings.kernels, settings.kernel_cache_dir) == ("torch", "/tmp/kernels")


def test_an_unknown_kernels_choice_stops_start_up_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALELLM_KERNELS", "flash")
    with pytest.raises(SystemExit) as exit_info:
        load_settings(EngineSettings)
    message = str(exit_info.value)
    assert "SCALELLM_KERNELS" in message and "'flash'" in message
    assert "'auto', 'torch' or 'native'" in message


def test_the_kernels_setting_offers_exactly_the_engines_choices() -> None:
    from services.engine.model.native import KERNEL_CHOICES

    assert get_args(EngineSettings.model_fields["kernels"].annotation) == KERNEL_CHOICES
