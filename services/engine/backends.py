"""Chooses the engine backend named by ``settings.engine_backend``.

The torch and transformers backends are imported only when chosen, so the echo
backend (pipeline tests, overhead benchmarks) starts without loading torch.
"""

from __future__ import annotations

from services.engine.contract import EngineBackend
from services.engine.echo import EchoBackend
from shared.settings import EngineSettings


class BackendUnavailable(RuntimeError):
    """The configured backend cannot be built (missing module or dependency)."""


def create_backend(settings: EngineSettings) -> EngineBackend:
    name = settings.engine_backend
    if name == "echo":
        return EchoBackend.from_settings(settings)
    if name == "torch":
        try:
            from services.engine.core.build import create_torch_backend
        except ImportError as exc:
            raise BackendUnavailable(
                f"engine backend 'torch' is unavailable: cannot import services.engine.core.build ({exc})"
            ) from exc
        return create_torch_backend(settings)
    if name == "hf":
        try:
            from services.engine.hf_backend import create_hf_backend
        except ImportError as exc:
            raise BackendUnavailable(
                f"engine backend 'hf' is unavailable: cannot import services.engine.hf_backend ({exc})"
            ) from exc
        return create_hf_backend(settings)
    # Settings validation admits only the names above; this guards direct construction.
    raise BackendUnavailable(f"unknown engine backend {name!r}: choose echo, torch or hf")
