"""Network namespaces as hosts on one private subnet, for tests/multihost.

``Network.create(["redis", "gateway", ...])`` makes one namespace per host plus a
"switch" namespace holding a Linux bridge; each host has one veth link (``eth0``
inside the host, its peer a port of the bridge), one address on SUBNET, loopback
up and no other route. The veths are created directly inside the namespaces, so
no interface ever appears in the caller's namespace, and deleting the namespaces
deletes them. Names carry a random suffix so parallel runs never collide.

Code reaches a host in two ways: ``prefix(host)`` (``ip netns exec NAME``) for a
process, ``call_in(host, fn)`` for a function of the test, run in a new thread
that has first joined the host's namespace (setns(2) changes only the calling
thread), so every socket it opens belongs to that host.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

SUBNET_PREFIX = "10.231.7"
PREFIX_LENGTH = 24
SWITCH = "switch"
BRIDGE = "br0"
LINK = "eth0"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
IP_TIMEOUT_S = 10.0

T = TypeVar("T")


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has its command line and stderr."""


def ip(*args: str) -> str:
    """Runs ``ip ARGS``; its stdout, or NetnsError with its stderr."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (a skip reason), or None when they can.

    Tries what the tests need, in a throwaway namespace: a bridge, a veth pair and
    ``ip netns exec`` (which also needs to make a mount namespace)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: creates network namespaces and veth links"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"sllm-probe-{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` is unavailable here: {exc}"
    try:
        ip("-n", probe, "link", "add", "name", BRIDGE, "type", "bridge")
        ip("link", "add", "name", "a", "netns", probe, "type", "veth", "peer", "name", "b", "netns", probe)
        ip("netns", "exec", probe, "true")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces lack what the test needs (bridge, veth, ip netns exec): {exc}"
    finally:
        try:
            ip("netns", "del", probe)
        except (NetnsError, OSError, subprocess.TimeoutExpired):
            pass
    return None


def _join_namespace(path: str) -> None:
    """Moves the calling thread (only it) into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)  # Python 3.12+
        if setns is not None:
            setns(fd, CLONE_NEWNET)
        elif _libc().setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@dataclass
class Network:
    """Hosts (network namespaces) on one bridge; ``destroy()`` removes them all."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    addresses: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    def namespace(self, host: str) -> str:
        return f"sllm-{self.suffix}-{host}"

    @property
    def subnet(self) -> str:
        return f"{SUBNET_PREFIX}.0/{PREFIX_LENGTH}"

    def create(self, hosts: Sequence[str]) -> None:
        """The switch, then each host at SUBNET_PREFIX.2, .3, ... in order. On an error the
        namespaces made so far stay in ``created`` for ``destroy()``."""
        switch = self._add_namespace(SWITCH)
        ip("-n", switch, "link", "add", "name", BRIDGE, "type", "bridge")
        ip("-n", switch, "link", "set", BRIDGE, "up")
        for number, host in enumerate(hosts, start=2):
            name = self._add_namespace(host)
            port = f"p-{host}"[:15]  # interface names have at most 15 characters
            ip("link", "add", "name", LINK, "netns", name, "type", "veth", "peer", "name", port, "netns", switch)
            ip("-n", switch, "link", "set", port, "master", BRIDGE, "up")
            address = f"{SUBNET_PREFIX}.{number}"
            ip("-n", name, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", LINK)
            ip("-n", name, "link", "set", LINK, "up")
            self.addresses[host] = address

    def _add_namespace(self, host: str) -> str:
        name = self.namespace(host)
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def destroy(self) -> list[str]:
        """Deletes every namespace made (and with them the veths and the bridge); the errors."""
        errors = []
        for name in reversed(self.created):
            try:
                ip("netns", "del", name)
            except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
        self.created.clear()
        return errors

    def leftovers(self) -> list[str]:
        """This network's namespaces that still exist."""
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if name.startswith(f"sllm-{self.suffix}-"))

    def prefix(self, host: str) -> list[str]:
        """The command prefix that runs a process on ``host``."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def run(self, host: str, *command: str) -> str:
        """Runs a command on ``host``; its stdout."""
        return ip("netns", "exec", self.namespace(host), *command)

    def inode(self, host: str) -> int:
        """The identity of the host's namespace, as /proc/PID/ns/net of its processes shows it."""
        return os.stat(os.path.join(NETNS_DIR, self.namespace(host))).st_ino

    def call_in(self, host: str, fn: Callable[[], T]) -> T:
        """``fn()`` run on ``host``: in a new thread that joined its network namespace."""
        results: list[T] = []
        errors: list[BaseException] = []
        path = os.path.join(NETNS_DIR, self.namespace(host))

        def target() -> None:
            try:
                _join_namespace(path)
                results.append(fn())
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=target, name=f"on-{host}", daemon=True)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return results[0]
