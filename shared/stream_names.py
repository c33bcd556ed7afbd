"""Every stream, consumer-group and key name the pipeline uses (``StreamNames``), derived from the
configured prefix; shared.transport.StreamTransport reads and writes them."""

from __future__ import annotations

from typing import ClassVar


class StreamNames:
    """Every stream, consumer-group and key name; streams and keys derive from the configured prefix."""

    # The consumer group each stage reads its work stream in (docs/protocol.md).
    tokenizer_group: ClassVar[str] = "tokenizers"  # on requests
    engine_group: ClassVar[str] = "engines"  # on tokenized
    detokenizer_group: ClassVar[str] = "detokenizers"  # on generated:{shard}

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.requests = f"{prefix}:requests"
        self.tokenized = f"{prefix}:tokenized"
        self.aborts = f"{prefix}:aborts"
        self.deadletter = f"{prefix}:deadletter"

    def is_work_stream(self, stream: str) -> bool:
        """Consumed by a group, so trimmed by progress, never by length (shared/work_streams.py)."""
        return stream in (self.requests, self.tokenized) or stream.startswith(f"{self.prefix}:generated:")

    def generated(self, shard: int) -> str:
        return f"{self.prefix}:generated:{shard}"

    def responses(self, gateway_id: str) -> str:
        return f"{self.prefix}:responses:{gateway_id}"

    def heartbeat(self, role: str, replica_id: str) -> str:
        return f"{self.prefix}:heartbeat:{role}:{replica_id}"

    def heartbeat_pattern(self, role: str) -> str:
        return f"{self.prefix}:heartbeat:{role}:*"

    def registry(self, role: str) -> str:
        return f"{self.prefix}:replicas:{role}"

    def reaped(self, role: str, replica_id: str) -> str:
        """Left by a replica that acted on ``replica_id`` being gone; its next beat reads and clears it."""
        return f"{self.prefix}:reaped:{role}:{replica_id}"

    def lease(self, resource: str) -> str:
        return f"{self.prefix}:lease:{resource}"

    def decode_state(self, request_id: str) -> str:
        """Where a detokenizer checkpoints a request's decoding (docs/architecture.md)."""
        return f"{self.prefix}:decode:{request_id}"

    def output_checkpoint(self, request_id: str) -> str:
        """Where an engine checkpoints the output token ids it published (shared/output_checkpoints.py)."""
        return f"{self.prefix}:outputs:{request_id}"
