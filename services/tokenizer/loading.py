"""Build a PromptProcessor for the configured model (reads files, no Redis)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from services.tokenizer.prompt import PromptProcessor
from shared.model_files import resolve_model_dir
from shared.settings import TokenizerSettings

log = logging.getLogger(__name__)

# Config fields that hold the context length, by model family.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")
# transformers uses a huge sentinel for "no limit" in tokenizer_config.
_NO_LIMIT = 10**7


def load_prompt_processor(settings: TokenizerSettings) -> PromptProcessor:
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(settings, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = _load_config(model_dir)
    max_model_len = settings.max_model_len or model_context_length(config, tokenizer)
    eos_ids = model_eos_token_ids(model_dir, config, tokenizer)
    log.info("tokenizer ready: %s, max_model_len=%d, eos_token_ids=%s", model_dir, max_model_len, eos_ids)
    return PromptProcessor(tokenizer, max_model_len, eos_ids)


def _load_config(model_dir: Path) -> Any | None:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        log.warning("no usable config.json in %s (%s)", model_dir, exc)
        return None


def model_context_length(config: Any | None, tokenizer: Any) -> int:
    """The model's context length: from its config, else from its tokenizer."""
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for field in _CONTEXT_FIELDS:
            value = getattr(text_config, field, None)
            if isinstance(value, int) and value > 0:
                return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _NO_LIMIT:
        return value
    raise SystemExit("cannot tell the model's context length: set SCALELLM_MAX_MODEL_LEN")


def model_eos_token_ids(model_dir: Path, config: Any | None, tokenizer: Any) -> list[int]:
    """Every id that ends generation: generation config, model config, tokenizer."""
    from transformers import GenerationConfig

    found: list[int] = []
    try:
        found += _as_ids(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except OSError:
        pass  # no generation_config.json: the model config and tokenizer decide
    if config is not None:
        found += _as_ids(getattr(config, "eos_token_id", None))
    found += _as_ids(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(found))


def _as_ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int)]
    return []
