"""``python -m services.detokenizer``: one detokenizer replica."""

from __future__ import annotations

import asyncio
import logging

from services.detokenizer.incremental import HFTokenDecoder
from services.detokenizer.leases import ShardLeases, ShardPlanner
from services.detokenizer.service import DetokenizerService
from services.detokenizer.state import DetokenizerState
from shared.model_files import ModelResolutionError, resolve_model_dir
from shared.runtime import configure_logging, stop_on_signals
from shared.settings import DetokenizerSettings, load_settings, new_replica_id
from shared.transport import StreamTransport

log = logging.getLogger("services.detokenizer")

# How long a replica over its share keeps a shard with requests in progress
# before giving it to a newcomer anyway.
REBALANCE_GRACE_S = 30.0


async def serve(settings: DetokenizerSettings) -> None:
    from transformers import AutoTokenizer

    replica_id = new_replica_id("detokenizer")
    redis_url = settings.require_redis_url()
    try:
        model_dir = resolve_model_dir(settings, weights=False)
    except ModelResolutionError as exc:
        raise SystemExit(f"detokenizer: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    transport = StreamTransport(
        redis_url,
        settings.stream_prefix,
        replica_id,
        maxlen=settings.stream_maxlen,
        max_deliveries=settings.max_deliveries,
    )
    planner = ShardPlanner(
        settings.detokenizer_shards,
        replica_id,
        release_grace_s=REBALANCE_GRACE_S,
        # Until a dead replica's heartbeat has expired it still counts, making this one look
        # over its share: shards taken from the dead are kept that long (a heartbeat
        # lasts its TTL), not given back to nobody.
        orphan_hold_s=settings.heartbeat_ttl_s + 1.0,
    )
    service = DetokenizerService(
        transport,
        DetokenizerState(HFTokenDecoder(tokenizer)),
        ShardLeases(transport, planner, ttl_ms=settings.lease_ttl_ms),
        replica_id=replica_id,
        batch_size=settings.batch_size,
        claim_idle_ms=settings.claim_idle_ms,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
    )
    stop = stop_on_signals()
    log.info("detokenizer %s serving %d shards with %s", replica_id, settings.detokenizer_shards, model_dir)
    try:
        await service.run(stop)
    finally:
        await transport.close()
    log.info("detokenizer %s stopped", replica_id)


def main() -> None:
    settings = load_settings(DetokenizerSettings)
    configure_logging(settings.log_level, settings.secrets())
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
