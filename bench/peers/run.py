"""``python -m bench.peers run``: the roofline, then each server in turn under the same load.

For each server: start it (servers.py), wait until ready, send one short warm-up request, run
the client once per concurrency (clients.py), stop it. A server that is not installed, does not
start or fails its load is reported and skipped; the others still run. Writes into ``--out``:
results.json (everything), table.md (the tables, the command, the CPU) and peers.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.peers import results, servers
from bench.peers.clients import OUR_CLIENT, Load, run_client, vllm_client
from bench.peers.plot import plot

ALL_PEERS = ("ours", "vllm", "llamacpp", "transformers")
PROMPTS = {1: 16, 64: 128}  # requests per run by concurrency (else 2x the concurrency, at least 16)
QUICK_PROMPTS = {1: 4, 64: 64}


def num_prompts(concurrency: int, quick: bool) -> int:
    table = QUICK_PROMPTS if quick else PROMPTS
    return table.get(concurrency, max(4 if quick else 16, concurrency * (1 if quick else 2)))


def measure_roofline(quick: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.peers.roofline", "--json", *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def warm_up(base_url: str, model: str) -> None:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "stream": False}
    httpx.post(base_url + "/v1/completions", json=body, timeout=300).raise_for_status()


def server_specs(args: argparse.Namespace, work: Path, model_dir: Path, gguf: Path) -> list[servers.ServerSpec]:
    specs = []
    for peer in args.peers:
        if peer == "ours":
            for index, env_text in enumerate(args.ours_env or [""]):
                env = servers.parse_env(env_text.replace(",", " ").split())
                specs.append(servers.ours_spec(env, servers.PORTS["ours"] + 10 * index))
        elif peer == "vllm":
            specs.append(servers.vllm_spec(work, model_dir, servers.parse_env(args.vllm_env)))
        elif peer == "llamacpp":
            specs.append(servers.llamacpp_spec(work, gguf))
        elif peer == "transformers":
            specs.append(servers.transformers_spec(work, model_dir))
    return specs


def source_state() -> str:
    """The commit ours ran from, and whether the engine's sources had uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "services", "shared"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes in services/ or shared/" if dirty else "")


def run(args: argparse.Namespace) -> Path:
    from shared.model_files import default_gguf_path, resolve_model_dir
    from shared.settings import CommonSettings

    work = Path(args.work_dir).expanduser()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out).expanduser() if args.out else work / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(CommonSettings(), weights=True)
    gguf = default_gguf_path()
    params = results.safetensors_params(model_dir)
    cpu, flags = results.cpu_description(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    print(f"CPU: {cpu}, {os.cpu_count()} cores; flags: {' '.join(flags)}", flush=True)
    print("measuring the roofline ...", flush=True)
    roofline = measure_roofline(args.quick)
    print(f"best matmul {roofline['best_matmul_gflops']:.0f} GFLOP/s ({roofline['best_matmul_dtype']}), "
          f"memory read {roofline['read_gbps']:.1f} GB/s", flush=True)  # fmt: skip

    args.source = source_state()
    input_len, output_len = (128, 32) if args.quick else (args.input_len, args.output_len)
    loads = [Load(c, num_prompts(c, args.quick), input_len, output_len) for c in args.concurrency]
    env = {**os.environ, **servers.OFFLINE}
    vllm = None if args.our_client else vllm_client(work)
    args.vllm_client = vllm is not None
    print(f"client: {'vllm bench serve' if vllm else OUR_CLIENT}", flush=True)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for spec in server_specs(args, work, model_dir, gguf):
        info: dict[str, Any] = {"command": shlex.join(spec.command), "env": spec.env}
        meta[spec.name] = info
        if not servers.installed(spec):
            info["error"] = f"not installed ({spec.command[0]}): python -m bench.peers install"
            print(f"== {spec.name}: {info['error']}", flush=True)
            continue
        slug = spec.name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
        print(f"== {spec.name}: starting", flush=True)
        client = None if spec.refuses_vllm_client else vllm
        if vllm is not None and spec.refuses_vllm_client:
            info["client_note"] = f"measured with {OUR_CLIENT}: {spec.refuses_vllm_client}"
        try:
            with servers.running(spec, out / f"{slug}.server.log") as server:
                info["ready_s"] = server.wait_ready()
                warm_up(server.base_url, spec.model)
                runs[spec.name] = {}
                for load in loads:
                    result = out / f"{slug}-c{load.concurrency}.json"
                    info["client"] = run_client(client, server.base_url, spec.model, model_dir, load, result, spec.name,
                                                out / f"{slug}.client.log", env=env,
                                                extra_body=spec.extra_body(load.output_len))  # fmt: skip
                    figures = results.load_figures(result)
                    if not figures["completed"]:
                        raise RuntimeError(f"c{load.concurrency}: every request failed (see {slug}.client.log)")
                    if (figures["total_output_tokens"] or 0) < figures["completed"] * load.output_len:
                        info["short_outputs"] = True  # stopped before output_len: EOS not ignored
                    runs[spec.name][load.concurrency] = figures
                    print(f"   c{load.concurrency}: {figures['output_throughput']:.1f} output tok/s, TTFT "
                          f"{figures['mean_ttft_ms']:.1f} ms, TPOT {figures['mean_tpot_ms']:.1f} ms "
                          f"({figures['completed']} done)", flush=True)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one server's failure must not stop the others
            info["error"] = str(exc)
            print(f"== {spec.name}: FAILED: {exc}", flush=True)
        # written after each server, so that an interrupted run keeps what it measured
        write_outputs(args, out, runs, meta, roofline, params, cpu, flags, input_len, output_len, echo=False)
        time.sleep(2.0)  # let the cores and ports settle before the next one
    return write_outputs(args, out, runs, meta, roofline, params, cpu, flags, input_len, output_len)


def write_outputs(
    args: argparse.Namespace, out: Path, runs: dict[str, dict[int, dict[str, Any]]], meta: dict[str, dict[str, Any]],
    roofline: dict[str, Any], params: int, cpu: str, flags: list[str], input_len: int, output_len: int,
    echo: bool = True,
) -> Path:  # fmt: skip
    low, high = min(args.concurrency), max(args.concurrency)
    latency_level, throughput_level = results.target_levels(args.concurrency)
    rate = float(roofline["best_matmul_gflops"])
    targets = {name: results.evaluate_targets(runs, ours=name, params=params, matmul_gflops=rate,
                                              low=latency_level, high=throughput_level)
               for name in runs if results.is_ours(name)}  # fmt: skip
    clients = sorted({m["client"] for m in meta.values() if "client" in m})
    command = "python -m bench.peers " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "cpu": cpu, "cores": os.cpu_count(), "flags": flags, "roofline": roofline,
        "ours_source": getattr(args, "source", ""), "params": params, "input_len": input_len, "output_len": output_len, "clients": clients,
        "servers": meta, "runs": {n: {str(c): f for c, f in r.items()} for n, r in runs.items()}, "targets": targets,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    fallback = "" if args.vllm_client else f" (vLLM's client was not available: {OUR_CLIENT}, which mirrors it)"
    text = [
        f"`{command}`, {data['date']}", "",
        f"CPU: {cpu}, {os.cpu_count()} cores; flags: {' '.join(flags)}", "",
        f"Roofline (torch {roofline['torch']}, {roofline['threads']} threads): best matmul "
        f"{rate:,.0f} GFLOP/s ({roofline['best_matmul_dtype']}; "
        + ", ".join(f"{k} {v:,.0f}" for k, v in roofline["matmul_gflops"].items())
        + f"), memory read {roofline['read_gbps']:.1f} GB/s.", "",
        f"Load: random prompts of {input_len} tokens, {output_len} out (ignore_eos), client: {', '.join(clients)}"
        f"{fallback}; {params:,} weights (2 FLOP per weight per token, prompt tokens included); "
        f"ours from {data['ours_source']}.", "",
        results.markdown_table(runs, params=params, matmul_gflops=rate, low=low, high=high), "",
    ]  # fmt: skip
    for name, rows in targets.items():
        text += [f"Targets for {name}:", "", results.targets_table(rows), ""]
    failed = {n: m["error"].splitlines()[0] for n, m in meta.items() if "error" in m}
    text += [f"- {n}: {e}" for n, e in failed.items()]
    text += [f"- {n}: {m['client_note']}" for n, m in meta.items() if "client_note" in m]
    text += [f"- {n}: some outputs ended before {output_len} tokens" for n, m in meta.items() if m.get("short_outputs")]
    (out / "table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    roof_tps = rate * 1e9 / (2 * params) * output_len / (input_len + output_len)
    title = f"{cpu}, {os.cpu_count()} cores ({' '.join(flags)})\nSmolLM2-135M, {input_len} in / {output_len} out"
    plot(runs, out / "peers.png", title=title, roofline_output_tps=roof_tps, low=low, high=high)
    if echo:
        print("\n".join(text))
        print(f"results in {out}")
    return out
