"""Where a first token's time goes at concurrency 1, for pipelines compared side by side.

    python -m bench.first_token --servers before=http://127.0.0.1:8161 after=http://127.0.0.1:8162

Sends one streamed completion at a time (random token ids, ``--input-len`` -> ``--output-len``,
``return_timeline``), alternating between the servers (and their order each round), so that a
machine whose load drifts treats them alike: an A/B of two checkouts' pipelines in one session,
each started with ``scalellm up --port N`` from its own folder (and its own Redis). Prints the
median of each span, in ms: the client's TTFT (request sent to the first ``data:`` bytes read,
on a raw socket), the stage timeline's hops (docs/api.md, "Stage timeline") and what lies
between the engine's first token and the client's first bytes. Hops come from each process's
wall clock: on one host, as here, they compare.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
import urllib.parse
import urllib.request
from typing import Any

SPANS = (
    ("TTFT (client)", "client_sent", "client_first_byte"),
    ("before the engine (client sent -> prefill starts)", "client_sent", "engine_scheduled"),
    ("  client sent -> gateway received", "client_sent", "gateway_received"),
    ("  gateway_in (parse, validate, publish)", "gateway_received", "gateway_published"),
    ("  requests_queue (-> tokenizer read)", "gateway_published", "tokenizer_read"),
    ("  tokenizer", "tokenizer_read", "tokenizer_done"),
    ("  tokenized_queue (-> engine pulled)", "tokenizer_done", "engine_pulled"),
    ("  engine_wait (pulled -> prefill starts)", "engine_pulled", "engine_scheduled"),
    ("prefill", "engine_scheduled", "engine_first_token"),
    ("first_output_return (engine first token -> gateway)", "engine_first_token", "gateway_first_output"),
    ("gateway first output -> client first byte", "gateway_first_output", "client_first_byte"),
    ("first token back (engine -> client)", "engine_first_token", "client_first_byte"),
    ("last token back (engine -> gateway)", "engine_finished", "gateway_last_output"),
)


def model_of(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/v1/models") as reply:
        return str(json.loads(reply.read())["data"][0]["id"])


def one_request(base_url: str, model: str, seed: int, input_len: int, output_len: int) -> dict[str, float]:
    """One streamed request: its timeline's hops plus the client's send and first-bytes times."""
    url = urllib.parse.urlsplit(base_url)
    body = json.dumps(
        {
            "model": model,
            "prompt": [(17 * seed + 31 * k) % 20000 + 1000 for k in range(input_len)],
            "max_tokens": output_len,
            "min_tokens": output_len,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0,
            "return_timeline": True,
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port or 80)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = time.time()
        sock.sendall(head + body)
        received, first = b"", None
        while chunk := sock.recv(65536):
            if first is None and b"data: {" in chunk:
                first = time.time()
            received += chunk
    hops: dict[str, float] = {}
    for line in received.split(b"\n"):
        if line.startswith(b"data: {") and b'"timeline"' in line:
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("timeline"):
                    hops = dict(choice["timeline"]["hops"])
    if first is None or not hops:
        raise RuntimeError(f"{base_url}: no streamed output with a timeline")
    return {**hops, "client_sent": sent, "client_first_byte": first}


def table(labels: list[str], runs: dict[str, list[dict[str, float]]]) -> str:
    def median_ms(label: str, start: str, end: str) -> str:
        spans = [hops[end] - hops[start] for hops in runs[label] if start in hops and end in hops]
        return f"{1000 * statistics.median(spans):.2f}" if spans else "-"

    lines = ["| span (median, ms) | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, start, end in SPANS:
        lines.append(f"| {name} | " + " | ".join(median_ms(label, start, end) for label in labels) + " |")
    rest = []
    for label in labels:
        spans = [
            (h["client_first_byte"] - h["client_sent"]) - (h["engine_first_token"] - h["engine_scheduled"])
            for h in runs[label]
        ]
        rest.append(f"{1000 * statistics.median(spans):.2f}")
    lines.append("| TTFT minus prefill | " + " | ".join(rest) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", required=True, metavar="LABEL=URL")
    parser.add_argument("--num-requests", type=int, default=60, help="per server")
    parser.add_argument("--warmups", type=int, default=10, help="per server, not counted")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args(argv)
    servers = dict(item.split("=", 1) for item in args.servers)
    labels = list(servers)
    models = {label: model_of(url) for label, url in servers.items()}
    for i in range(args.warmups):
        for label in labels:
            one_request(servers[label], models[label], 5000 + i, args.input_len, args.output_len)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for i in range(args.num_requests):
        for label in labels if i % 2 == 0 else labels[::-1]:
            runs[label].append(one_request(servers[label], models[label], i, args.input_len, args.output_len))
            time.sleep(0.02)
    print(table(labels, runs))


if __name__ == "__main__":
    main()
