"""The load: vLLM's client (``vllm bench serve`` from the vLLM venv) or, without it, ours.

Random prompts of ``input_len`` tokens made by the client with the model's tokenizer (text, so
every server tokenizes them itself), ``output_len`` tokens out with ignore_eos, streaming on
/v1/completions, at most ``concurrency`` in flight, all sent at once. ``scalellm bench`` mirrors
vLLM's client key for key; the result says which one measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VLLM_CLIENT = "vllm bench serve"
OUR_CLIENT = "scalellm bench"


@dataclass
class Load:
    concurrency: int
    num_prompts: int
    input_len: int = 128
    output_len: int = 128
    seed: int = 0


def vllm_client(work: Path) -> Path | None:
    """vLLM's CLI from the vLLM venv, if it is there and ``vllm bench serve --help`` works."""
    path = work / "vllm" / "venv" / "bin" / "vllm"
    if not path.exists():
        return None
    done = subprocess.run([str(path), "bench", "serve", "--help"], capture_output=True, timeout=300, check=False)
    return path if done.returncode == 0 else None


def _eos(extra_body: dict[str, str]) -> list[str]:
    """ignore_eos, or the server's own way of asking for exactly the output length."""
    return ["--extra-body", json.dumps(extra_body)] if extra_body else ["--ignore-eos"]


def vllm_command(
    vllm: Path, base_url: str, model: str, tokenizer: Path, load: Load, result: Path, extra_body: dict[str, str]
) -> list[str]:
    return [
        str(vllm), "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", str(tokenizer), "--dataset-name", "random",
        "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
        "--num-prompts", str(load.num_prompts), "--max-concurrency", str(load.concurrency),
        "--request-rate", "inf", *_eos(extra_body), "--temperature", "0", "--seed", str(load.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip


def ours_command(
    base_url: str, model: str, tokenizer: Path, load: Load, result: Path, label: str, extra_body: dict[str, str]
) -> list[str]:
    eos = ["--no-ignore-eos", "--extra-body", json.dumps(extra_body)] if extra_body else ["--ignore-eos"]
    return [
        sys.executable, "-m", "bench.serve", "--base-url", base_url, "--model", model,
        "--tokenizer", str(tokenizer), "--prompt-format", "text", "--dataset-name", "random",
        "--input-len", str(load.input_len), "--output-len", str(load.output_len),
        "--num-prompts", str(load.num_prompts), "--max-concurrency", str(load.concurrency), "--seed", str(load.seed),
        "--save-result", str(result), "--label", label, "--no-progress", "--no-server-metrics", *eos,
    ]  # fmt: skip


def run_client(
    vllm: Path | None, base_url: str, model: str, tokenizer: Path, load: Load, result: Path, label: str, log: Path,
    *, env: dict[str, str] | None = None, extra_body: dict[str, str] | None = None,
) -> str:  # fmt: skip
    """Runs one load against a ready server with vLLM's client, or ours where ``vllm`` is None;
    returns the client's name. Raises if it failed."""
    if vllm is not None:
        command, client = vllm_command(vllm, base_url, model, tokenizer, load, result, extra_body or {}), VLLM_CLIENT
    else:
        command = ours_command(base_url, model, tokenizer, load, result, label, extra_body or {})
        client = OUR_CLIENT
    result.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write("+ " + " ".join(command) + "\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode or not result.exists():
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{client} failed ({done.returncode}) against {base_url}:\n{tail}")
    return client
