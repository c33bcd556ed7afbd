"""``python -m services.tokenizer``: one tokenizer replica."""

from __future__ import annotations

import asyncio
import logging
import signal

from services.tokenizer.loading import load_prompt_processor
from services.tokenizer.service import TokenizerService, TokenizerWorker
from shared.model_files import ModelResolutionError
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
    transport = StreamTransport(redis_url, settings.stream_prefix, replica_id, maxlen=settings.stream_maxlen)
    service = TokenizerService(
        transport,
        TokenizerWorker(processor, transport.names),
        replica_id=replica_id,
        batch_size=settings.batch_size,
        claim_idle_ms=settings.claim_idle_ms,
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("tokenizer %s serving %s", replica_id, transport.names.requests)
    try:
        await service.run(stop)
    finally:
        await transport.close()
    log.info("tokenizer %s stopped", replica_id)


def main() -> None:
    settings = load_settings(TokenizerSettings)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
