"""``scalellm up``: the whole pipeline as separate OS processes on this machine.

Starts its own redis-server unless SCALELLM_REDIS_URL is set, prepares the
model cache once (so replicas do not all convert the GGUF at the same time),
starts every service, prints the URL once /ready says every stage is alive,
and on Ctrl-C / SIGTERM stops everything it started.

A service (or the redis-server) that dies is restarted after a short backoff
while the rest keep serving: the replicas cover for each other. One that keeps
dying (a crash loop) stops everything, with a message that says which, how,
and what it last wrote, and the exit code 1. If ``scalellm up`` itself is
killed, its children end too (orphans.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import TextIO

from services.launcher.redis_keeper import RedisKeeper
from services.launcher.restart_policy import RestartPolicy
from services.launcher.supervisor import PREFIX, ChildSpec, Supervisor
from services.redis_server import EmbeddedRedis, EmbeddedRedisError
from shared.redaction import redact_url
from shared.settings import CommonSettings, EngineSettings, GatewaySettings, LauncherSettings, load_settings

# The directory holding the ``services`` and ``shared`` packages.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
HEALTH_POLL_S = 0.25
# How often deaths are looked for: small against the 0.2 s first restart.
TEND_INTERVAL_S = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults left as None are read from the settings in run(), so building
    # the parser never reads (or rejects) the environment.
    parser.add_argument("--host", help="gateway bind address (default: SCALELLM_GATEWAY_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=_port, help="gateway port (default: SCALELLM_GATEWAY_PORT or 8000)")
    parser.add_argument("--tokenizers", type=_count, default=1, metavar="N", help="tokenizer replicas (default 1)")
    parser.add_argument("--detokenizers", type=_count, default=1, metavar="K", help="detokenizer replicas (default 1)")
    parser.add_argument("--engines", type=_count, default=1, metavar="M", help="engine replicas (default 1)")
    parser.add_argument(
        "--backend", choices=["echo", "torch", "hf"],
        help="engine backend (default: SCALELLM_ENGINE_BACKEND or torch)",
    )  # fmt: skip
    parser.add_argument(
        "--ready-timeout", type=float, default=600.0, metavar="S",
        help="give up if the pipeline is not healthy after this many seconds (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--grace", type=float, default=10.0, metavar="S",
        help="on stop, seconds each service gets before it is killed (default %(default)s)",
    )  # fmt: skip


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from the settings."""
    if args.host is None or args.port is None:
        gateway = load_settings(GatewaySettings)
        args.host = gateway.gateway_host if args.host is None else args.host
        args.port = gateway.gateway_port if args.port is None else args.port
    if args.backend is None:
        args.backend = load_settings(EngineSettings).engine_backend


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def service_specs(args: argparse.Namespace, redis_url: str, base_env: Mapping[str, str]) -> list[ChildSpec]:
    """One process per replica: ``python -m services.<role>`` with the pipeline's settings."""
    env = dict(base_env)
    env.update(
        SCALELLM_REDIS_URL=redis_url,
        SCALELLM_GATEWAY_HOST=args.host,
        SCALELLM_GATEWAY_PORT=str(args.port),
        SCALELLM_ENGINE_BACKEND=args.backend,
        PYTHONUNBUFFERED="1",  # output lines appear as they are written
    )
    # The children import our packages even when `scalellm` runs from elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), base_env.get("PYTHONPATH", "")) if p)
    specs = [ChildSpec("gateway", [sys.executable, "-m", "services.gateway"], env)]
    for role, count in (("tokenizer", args.tokenizers), ("engine", args.engines), ("detokenizer", args.detokenizers)):
        argv = [sys.executable, "-m", f"services.{role}"]
        specs.extend(ChildSpec(f"{role}-{i}", argv, env) for i in range(1, count + 1))
    return specs


def prepare_model(backend: str, out: TextIO) -> None:
    """Convert / download the model once, before N replicas would race to do it."""
    try:
        from shared.model_files import ModelResolutionError, resolve_model_dir
    except ImportError as exc:
        raise SystemExit(f"scalellm up: cannot prepare the model: {exc}") from None
    settings = load_settings(CommonSettings)
    out.write(f"preparing the model {settings.model} ...\n")
    out.flush()
    try:
        folder = resolve_model_dir(settings, weights=backend != "echo")
    except ModelResolutionError as exc:
        raise SystemExit(f"scalellm up: {exc}") from None
    out.write(f"model ready in {folder}\n")
    out.flush()


def is_healthy(url: str) -> bool:
    import httpx  # only `up` needs it, not every role started through the CLI

    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def supervise(
    supervisor: Supervisor,
    specs: list[ChildSpec],
    stop: threading.Event,
    *,
    ready: Callable[[], bool] | None = None,
    ready_message: str = "ready",
    ready_timeout_s: float = 600.0,
    started_at: float | None = None,
    redis: RedisKeeper | None = None,
) -> int:
    """Start the children, wait for ``ready``, restart the ones that die, until ``stop``.

    Runs on the thread that started ``redis``: children die with the thread
    that forked them. Returns the exit code: 0 after a requested stop, 1 after
    a crash loop or if the pipeline never became ready. Always stops every
    child before returning.
    """
    started_at = time.monotonic() if started_at is None else started_at
    try:
        for spec in specs:
            supervisor.start(spec)
        is_ready = ready is None
        next_health_check = 0.0
        while not stop.is_set():
            looping = supervisor.tend()
            if looping is not None:
                supervisor.say(f"{PREFIX} {supervisor.report(looping)}")
                supervisor.say(f"{PREFIX} {looping.name} keeps dying; stopping everything")
                return 1
            fatal = redis.tend() if redis is not None else None
            if fatal is not None:
                supervisor.say(f"{PREFIX} {fatal}")
                supervisor.say(f"{PREFIX} the redis-server cannot be kept running; stopping everything")
                return 1
            if not is_ready and ready is not None and time.monotonic() >= next_health_check:
                if ready():
                    is_ready = True
                    supervisor.say(f"{ready_message} ({time.monotonic() - started_at:.1f} s)")
                elif time.monotonic() - started_at > ready_timeout_s:
                    supervisor.say(f"scalellm up: not ready after {ready_timeout_s:.0f} s; stopping")
                    return 1
                next_health_check = time.monotonic() + HEALTH_POLL_S
            stop.wait(TEND_INTERVAL_S)
        supervisor.say("scalellm up: stopping")
        return 0
    finally:
        supervisor.stop_all()


@contextmanager
def handling_stop_signals(stop: threading.Event, supervisor: Supervisor) -> Iterator[None]:
    """SIGINT / SIGTERM set ``stop``; a second one cuts the grace period short."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            supervisor.force()
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Raises KeyboardInterrupt on Ctrl-C / SIGTERM before the services start
    (after stopping the Redis it started); returns the exit code otherwise."""
    started_at = time.monotonic()
    resolve_defaults(args)
    settings = load_settings(LauncherSettings)
    # Until supervision starts, SIGTERM unwinds like Ctrl-C, so the Redis
    # started below (in its own session) is not left behind.
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(args, settings, out, started_at)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _run(args: argparse.Namespace, settings: LauncherSettings, out: TextIO, started_at: float) -> int:
    policy = RestartPolicy(
        crash_loop_deaths=settings.crash_loop_deaths, crash_loop_window_s=settings.crash_loop_window_s
    )
    with ExitStack() as stack:
        redis_url = settings.redis_url
        server: EmbeddedRedis | None = None
        if redis_url:
            out.write(f"using Redis at {redact_url(redis_url)}\n")
        else:
            try:
                server = stack.enter_context(EmbeddedRedis())
            except EmbeddedRedisError as exc:
                raise SystemExit(f"scalellm up: {exc}") from None
            redis_url = server.url
            out.write(f"started redis-server at {redis_url}\n{PREFIX} started redis-server (pid {server.pid})\n")
        out.flush()
        prepare_model(args.backend, out)
        supervisor = Supervisor(out, grace_s=args.grace, policy=policy)
        keeper = RedisKeeper(server, policy, supervisor.say) if server is not None else None
        stop = threading.Event()
        health_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        health_url = f"http://{_url_host(health_host)}:{args.port}/ready"
        with handling_stop_signals(stop, supervisor):
            code = supervise(
                supervisor,
                service_specs(args, redis_url, os.environ),
                stop,
                ready=lambda: is_healthy(health_url),
                ready_message=f"ready: http://{_url_host(args.host)}:{args.port}",
                ready_timeout_s=args.ready_timeout,
                started_at=started_at,
                redis=keeper,
            )
    return code


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
