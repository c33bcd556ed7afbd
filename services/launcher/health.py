"""``scalellm health ROLE``: is this host's ROLE replica alive? The check behind compose.yaml's health checks.

Every replica beats ``{p}:heartbeat:{role}:{replica_id}`` once it is serving (its model
loaded), the key expiring after SCALELLM_HEARTBEAT_TTL_S, and lists itself in
``{p}:replicas:{role}``. Replica ids are ``{role}-{hostname}-{8 hex digits}``
(shared.settings.new_replica_id), and a container's hostname is its own, so a live
heartbeat under this hostname is the replica in this container serving and reaching
Redis: the very signal the other replicas use to decide whether to take its work over.
A process that runs but whose loop is stuck stops beating, and so fails this check too.

Exit status 0: alive; 1: not (yet) beating, or Redis unreachable; the line printed says
which (docker keeps it: ``docker inspect --format '{{json .State.Health}}' CONTAINER``).
"""

from __future__ import annotations

import argparse
import re
import socket

from shared.redaction import redact_url
from shared.redis_client import CLIENT_ERRORS, SyncRedis, sync_client
from shared.settings import CommonSettings, load_settings
from shared.transport import StreamNames

# A health check must answer well within its own timeout (compose.yaml: 5 s).
REDIS_TIMEOUT_S = 2.0


def host_replica_id_pattern(role: str, hostname: str | None = None) -> re.Pattern[str]:
    """The ids shared.settings.new_replica_id gives replicas of ``role`` on this host (a test pins the two together)."""
    host = socket.gethostname() if hostname is None else hostname
    return re.compile(re.escape(f"{role}-{host}-") + "[0-9a-f]{8}")


def live_host_replicas(client: SyncRedis, names: StreamNames, role: str, hostname: str | None = None) -> list[str]:
    """The ids of this host's ``role`` replicas whose heartbeat has not expired."""
    pattern = host_replica_id_pattern(role, hostname)
    # The registry, not a SCAN for heartbeat keys: it holds only this role's replicas,
    # while a SCAN walks every key (one per request in flight, and more).
    registered = [_text(key) for key in client.hkeys(names.registry(role))]
    ours = [replica_id for replica_id in registered if pattern.fullmatch(replica_id)]
    if not ours:
        return []
    beats = client.mget([names.heartbeat(role, replica_id) for replica_id in ours])
    return [replica_id for replica_id, beat in zip(ours, beats) if beat is not None]


def check(role: str, settings: CommonSettings) -> tuple[bool, str]:
    """Whether a replica of ``role`` on this host is alive, and a line saying so."""
    url = settings.require_redis_url()
    client: SyncRedis | None = None
    try:
        # Inside the try: a cluster client asks for the slots as it is made, Sentinel for the master.
        client = sync_client(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        live = live_host_replicas(client, StreamNames(settings.stream_prefix), role)
    except CLIENT_ERRORS as exc:
        return False, f"unhealthy: Redis at {redact_url(url)} did not answer: {exc}"
    finally:
        if client is not None:
            client.close()
    if not live:
        return False, f"unhealthy: no {role} replica on {socket.gethostname()} is beating (starting, stuck or dead)"
    return True, f"healthy: {', '.join(live)}"


def run(args: argparse.Namespace) -> int:
    healthy, line = check(args.role, load_settings(CommonSettings))
    print(line)
    return 0 if healthy else 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
