"""``python -m services.tokenizer``: one tokenizer replica."""

from __future__ import annotations

import asyncio
import logging

from services.tokenizer.loading import load_prompt_processor
from services.tokenizer.service import TokenizerService, TokenizerWorker
from shared.model_files import ModelResolutionError
from shared.runtime import configure_logging, stop_on_signals
from shared.settings import TokenizerSettings, load_settings, new_replica_id
from shared.transport import StreamTransport

log = logging.getLogger("services.tokenizer")


async def serve(settings: TokenizerSettings) -> None:
    replica_id = new_replica_id("tokenizer")
    redis_url = settings.require_redis_url()
    try:
        processor = load_prompt_processor(settings)
    except ModelResolutionError as exc:
        raise SystemExit(f"tokenizer: {exc}") from None
    transport = StreamTransport(
        redis_url,
        settings.stream_prefix,
        replica_id,
        maxlen=settings.stream_maxlen,
        max_deliveries=settings.max_deliveries,
    )
    service = TokenizerService(
        transport,
        TokenizerWorker(processor, transport.names),
        replica_id=replica_id,
        batch_size=settings.batch_size,
        claim_idle_ms=settings.claim_idle_ms,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
    )
    stop = stop_on_signals()
    log.info("tokenizer %s serving %s", replica_id, transport.names.requests)
    try:
        await service.run(stop)
    finally:
        await transport.close()
    log.info("tokenizer %s stopped", replica_id)


def main() -> None:
    settings = load_settings(TokenizerSettings)
    configure_logging(settings.log_level, settings.secrets())
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
