"""bench/peers: the pure parts (result files, targets, tables, parsing); no server is started."""

from __future__ import annotations

import json
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.peers import results, servers
from bench.peers.__main__ import build_parser
from bench.peers.clients import Load, ours_command, vllm_command
from bench.peers.install import wheel_requirements
from bench.peers.run import num_prompts

PARAMS = 100_000_000


def _figures(ttft: float, tpot: float, tput: float, total: float | None = None) -> dict[str, Any]:
    return {"mean_ttft_ms": ttft, "mean_tpot_ms": tpot, "output_throughput": tput,
            "total_token_throughput": total if total is not None else 2 * tput, "failed": 0}  # fmt: skip


def _runs(ours_tpot: float = 10.0, ours_ttft: float = 40.0, ours_tput: float = 900.0) -> dict[str, Any]:
    return {
        "ours": {1: _figures(ours_ttft, ours_tpot, 50.0), 64: _figures(2000.0, 70.0, ours_tput)},
        "vllm": {1: _figures(139.0, 30.0, 30.0), 64: _figures(3100.0, 136.0, 400.0)},
        "llamacpp": {1: _figures(100.0, 11.0, 80.0), 64: _figures(5000.0, 300.0, 111.0)},
    }


def test_vllm_result_file_is_read_at_the_top_level() -> None:
    data = {"completed": 16, "num_prompts": 16, "duration": 8.0, "total_input_tokens": 2048,
            "total_output_tokens": 2048, "output_throughput": 256.0, "mean_ttft_ms": 40.0, "mean_tpot_ms": 20.0,
            "max_concurrency": 1}  # fmt: skip
    figures = results.client_figures(data)
    assert figures["output_throughput"] == 256.0
    assert figures["failed"] == 0
    assert figures["total_token_throughput"] == 512.0  # vLLM's file may lack it: computed
    assert figures["max_concurrency"] == 1


def test_our_result_file_is_read_from_its_first_run(tmp_path: Path) -> None:
    data = {"kind": "scalellm-bench", "runs": [{"max_concurrency": 64, "metrics": {
        "completed": 128, "failed": 0, "output_throughput": 791.0, "total_token_throughput": 1582.0,
        "mean_ttft_ms": 1230.0, "mean_tpot_ms": 70.3}}]}  # fmt: skip
    path = tmp_path / "ours.json"
    path.write_text(json.dumps(data))
    figures = results.load_figures(path)
    assert figures["max_concurrency"] == 64
    assert figures["mean_tpot_ms"] == 70.3
    with pytest.raises(ValueError):
        results.client_figures({"kind": "scalellm-bench", "runs": []})


def test_weights_are_counted_from_safetensors_headers(tmp_path: Path) -> None:
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]}}  # fmt: skip
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(68))
    assert results.safetensors_params(tmp_path) == 17
    with pytest.raises(FileNotFoundError):
        results.safetensors_params(tmp_path / "nothing")


def test_roofline_fraction_counts_two_flop_per_weight_per_token() -> None:
    # 1000 tokens/s x 2 x 1e8 weights = 200 GFLOP/s of 400
    assert results.roofline_fraction(1000.0, PARAMS, 400.0) == pytest.approx(0.5)
    assert results.roofline_fraction(None, PARAMS, 400.0) is None
    assert results.roofline_fraction(1000.0, PARAMS, 0.0) is None


def test_targets_held_and_missed() -> None:
    rows = results.evaluate_targets(_runs(), params=PARAMS, matmul_gflops=400.0)
    tpot, ttft, tput, roof = rows
    assert tpot["bound"] == 11.0 and tpot["held"] is True  # 10 <= llama.cpp's 11
    assert ttft["bound"] == 50.0 and ttft["held"] is True  # 40 <= half of 100 (llama.cpp, the best)
    assert tput["bound"] == 600.0 and tput["held"] is True  # 900 >= 1.5 x vLLM's 400
    assert roof["value"] == pytest.approx(2 * PARAMS * 1800.0 / 400e9) and roof["held"] is True
    missed = results.evaluate_targets(_runs(ours_tpot=12.0, ours_ttft=60.0, ours_tput=500.0), params=PARAMS,
                                      matmul_gflops=4000.0)  # fmt: skip
    assert [r["held"] for r in missed] == [False, False, False, False]


def test_targets_not_measured_without_the_peer() -> None:
    runs = _runs()
    del runs["llamacpp"]
    rows = results.evaluate_targets(runs, params=PARAMS, matmul_gflops=400.0)
    assert rows[0]["held"] is None and rows[0]["bound"] is None
    assert rows[1]["bound"] == pytest.approx(69.5)  # vLLM is now the best peer


def test_other_configurations_of_ours_are_not_peers() -> None:
    runs = _runs()
    runs["ours (SCALELLM_QUANTIZATION=gguf)"] = {1: _figures(5.0, 5.0, 1.0), 64: _figures(1.0, 1.0, 5000.0)}
    rows = results.evaluate_targets(runs, params=PARAMS, matmul_gflops=400.0)
    assert rows[2]["bound"] == 600.0  # still vLLM's 400 x 1.5
    gguf = results.evaluate_targets(runs, ours="ours (SCALELLM_QUANTIZATION=gguf)", params=PARAMS, matmul_gflops=400.0)
    assert gguf[2]["value"] == 5000.0 and gguf[2]["bound"] == 600.0


def test_tables() -> None:
    table = results.markdown_table(_runs(), params=PARAMS, matmul_gflops=400.0)
    lines = table.splitlines()
    assert lines[0].startswith("| server | c1 mean TTFT")
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| ours | 40.0 | 10.0 | 900.0 | 2,000.0 | 70.0 | 90.0% | 0 |")
    missing = results.markdown_table({"ours": {1: _figures(40.0, 10.0, 50.0)}}, params=PARAMS, matmul_gflops=400.0)
    assert "| ours | 40.0 | 10.0 | - | - | - | - | 0 |" in missing
    rows = results.evaluate_targets(_runs(ours_tpot=12.0), params=PARAMS, matmul_gflops=400.0)
    targets = results.targets_table(rows)
    assert "| c1 mean TPOT <= llama.cpp's (ms) | 12.0 | 11.0 | **no** |" in targets
    assert "| c64 share of the matmul roofline >= 70% | 90.0% | 70% | yes |" in targets


def test_cpu_description() -> None:
    info = "processor: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 fma avx512f amx_bf16 sse\n"
    assert results.cpu_description(info) == ("Intel(R) Xeon(R) Processor", ["avx2", "fma", "avx512f", "amx_bf16"])
    assert results.cpu_description("") == ("unknown CPU", [])


def test_env_and_names() -> None:
    assert servers.parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError):
        servers.parse_env(["NOEQUALS"])
    assert servers.ours_name({}) == "ours"
    assert servers.ours_name({"SCALELLM_QUANTIZATION": "gguf"}) == "ours (SCALELLM_QUANTIZATION=gguf)"
    assert results.is_ours("ours (SCALELLM_QUANTIZATION=gguf)") and not results.is_ours("ourselves")


def test_server_commands_listen_on_loopback(tmp_path: Path) -> None:
    specs = [servers.ours_spec({}), servers.vllm_spec(tmp_path, tmp_path / "m", {"VLLM_CPU_KVCACHE_SPACE": "1"}),
             servers.llamacpp_spec(tmp_path, tmp_path / "m.gguf"), servers.transformers_spec(tmp_path, tmp_path / "m")]  # fmt: skip
    for spec in specs:
        assert spec.command[spec.command.index("--host") + 1] == "127.0.0.1"
        assert not servers.installed(spec) or spec.name == "ours"
    assert specs[1].env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # --vllm-env wins over the defaults
    assert specs[2].command[specs[2].command.index("-np") + 1] == "64"
    assert int(specs[2].command[specs[2].command.index("-c") + 1]) >= 64 * 256


def test_client_commands(tmp_path: Path) -> None:
    load = Load(concurrency=64, num_prompts=128)
    vllm = vllm_command(tmp_path / "vllm", "http://127.0.0.1:1", "m", tmp_path, load, tmp_path / "r" / "x.json", {})
    assert vllm[1:3] == ["bench", "serve"] and "--ignore-eos" in vllm
    assert vllm[vllm.index("--result-filename") + 1] == "x.json"
    ours = ours_command("http://127.0.0.1:1", "m", tmp_path, load, tmp_path / "x.json", "ours", {})
    assert ours[ours.index("--max-concurrency") + 1] == "64" and ours[ours.index("--prompt-format") + 1] == "text"
    assert "--ignore-eos" in ours


def test_transformers_gets_its_output_length_through_generation_config(tmp_path: Path) -> None:
    spec = servers.transformers_spec(tmp_path, tmp_path / "m")
    body = spec.extra_body(128)
    assert json.loads(body["generation_config"]) == {"min_new_tokens": 128}
    assert servers.vllm_spec(tmp_path, tmp_path / "m", {}).extra_body(128) == {}
    load = Load(concurrency=1, num_prompts=4)
    vllm = vllm_command(tmp_path / "vllm", "http://127.0.0.1:1", "m", tmp_path, load, tmp_path / "x.json", body)
    assert "--ignore-eos" not in vllm and json.loads(vllm[vllm.index("--extra-body") + 1]) == body
    ours = ours_command("http://127.0.0.1:1", "m", tmp_path, load, tmp_path / "x.json", "t", body)
    assert "--no-ignore-eos" in ours and "--ignore-eos" not in ours


def test_wheel_requirements_evaluate_markers_and_skip(tmp_path: Path) -> None:
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    meta = ("Metadata-Version: 2.1\nName: x\nVersion: 1.0\nRequires-Dist: numpy\n"
            "Requires-Dist: torch==2.13.0+cpu; platform_machine == \"x86_64\"\n"
            "Requires-Dist: torchvision; platform_machine != \"riscv64\"\n"
            "Requires-Dist: pandas; extra == \"bench\"\nRequires-Dist: never; python_version < \"3\"\n"
            "Requires-Dist: regex>=2024\n")  # fmt: skip
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("x-1.0.dist-info/METADATA", meta)
    assert wheel_requirements(wheel, {"torch", "torchvision"}) == ["numpy", "regex>=2024"]


def test_prompts_per_run_and_the_cli() -> None:
    assert num_prompts(1, False) == 16 and num_prompts(64, False) == 128
    assert num_prompts(1, True) == 4 and num_prompts(8, False) == 16
    args = build_parser().parse_args(["run", "--peers", "ours,llamacpp", "--concurrency", "1,64", "--ours-env", "",
                                      "--ours-env", "SCALELLM_QUANTIZATION=gguf", "--quick"])  # fmt: skip
    assert args.peers == ["ours", "llamacpp"] and args.concurrency == [1, 64] and args.quick
    assert args.ours_env == ["", "SCALELLM_QUANTIZATION=gguf"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--peers", "sglang"])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.peers.plot import plot

    plot(_runs(), tmp_path / "p.png", title="CPU (avx512f)", roofline_output_tps=1500.0)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_outputs_of_a_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import argparse

    from bench.peers.run import write_outputs

    args = argparse.Namespace(concurrency=[1, 64], argv=["run", "--quick"], vllm_client=False)
    meta = {"ours": {"client": "scalellm bench"}, "vllm": {"error": "vllm exited (1) before ready:\nTraceback"},
            "llamacpp": {"client": "scalellm bench", "client_note": "measured with scalellm bench: why"}}  # fmt: skip
    roofline = {"best_matmul_gflops": 400.0, "best_matmul_dtype": "bfloat16", "read_gbps": 20.0, "torch": "2.13.0",
                "threads": 2, "matmul_gflops": {"float32": 100.0, "bfloat16": 400.0}}  # fmt: skip
    runs = _runs()
    del runs["vllm"]
    write_outputs(args, tmp_path, runs, meta, roofline, PARAMS, "Xeon", ["avx512f"], 128, 128, echo=False)
    table = (tmp_path / "table.md").read_text()
    assert "`python -m bench.peers run --quick`" in table and "CPU: Xeon" in table and "flags: avx512f" in table
    assert "vLLM's client was not available" in table
    assert "- vllm: vllm exited (1) before ready:\n" in table and "Traceback" not in table
    assert "- llamacpp: measured with scalellm bench: why" in table
    assert "Targets for ours:" in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["runs"]["ours"]["64"]["output_throughput"] == 900.0 and data["targets"]["ours"][0]["held"] is True
    assert (tmp_path / "peers.png").exists()


def test_roofline_times_a_slow_dtype_at_the_probe_size_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 through torch on a CPU without bf16 instructions runs at ~1 GFLOP/s: timing it at 4096 took
    minutes of every peers run on an AMD Zen 3. It is timed at the probe size and reported from that."""
    from bench.peers import roofline

    sizes_made: dict[str, list[int]] = {"fast": [], "slow": []}

    def product(name: str, pause: float) -> Callable[[int], Callable[[], object]]:
        def make(n: int) -> Callable[[], object]:
            sizes_made[name].append(n)
            return lambda: time.sleep(pause * n / roofline.PROBE_SIZE)

        return make

    monkeypatch.setattr(roofline, "_products", lambda: {"fast": product("fast", 0.0005), "slow": product("slow", 0.02)})
    rates = roofline.matmul_rates((1024,), repeats=1, min_s=0.0)
    assert sizes_made == {"fast": [roofline.PROBE_SIZE, 1024], "slow": [roofline.PROBE_SIZE]}
    assert rates["fast"] > rates["slow"] > 0


def test_each_kind_of_target_is_read_at_its_own_load() -> None:
    assert results.target_levels([1, 64]) == (1, 64)
    assert results.target_levels([1]) == (1, None)  # a c1-only run has no throughput target
    assert results.target_levels([16, 64]) == (None, 64)  # nor a run without c1 a latency one
    c1_only = results.evaluate_targets(_runs(), params=PARAMS, matmul_gflops=400.0, high=None)
    assert [row["target"] for row in c1_only] == [
        "c1 mean TPOT <= llama.cpp's (ms)",
        "c1 mean TTFT <= 0.5 x best peer's (ms)",
    ]
    c64_only = results.evaluate_targets(_runs(), params=PARAMS, matmul_gflops=400.0, low=None)
    assert [row["target"].split()[0] for row in c64_only] == ["c64", "c64"] and c64_only[0]["held"] is True
