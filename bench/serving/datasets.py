"""The prompts a run sends: random (exact token lengths), ShareGPT conversations, shared prefixes.

Each dataset makes ``RequestSpec``s from a seed, so a run is reproducible. Token-id prompts
(``prompt_format="ids"``, /v1/completions only) have exact lengths with or without a
tokenizer; text prompts have exact lengths with one (``ExactText``) and approximate lengths
without (then ``exact`` is false and the result says so). For chat, the length is the user
message's; the server's chat template adds its own tokens around it.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from bench.serving.tokens import ApproximateCounter, ExactText, Tokenizer, approximate_text

PromptFormat = Literal["ids", "text"]
# Without a tokenizer, random ids come from [FIRST_RANDOM_ID, vocab_size): the lowest ids are
# special tokens in most vocabularies.
FIRST_RANDOM_ID = 100


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | list[int]
    prompt_len: int  # tokens in the prompt (approximate when the dataset's lengths are)
    output_len: int  # max_tokens asked for


class Dataset(Protocol):
    @property
    def exact(self) -> bool:
        """Are the prompt_len values exact token counts?"""
        ...

    def generate(self, count: int, seed: int) -> list[RequestSpec]: ...

    def describe(self) -> dict[str, Any]:
        """What made the prompts, for the result file."""
        ...


class PromptMaker:
    """Prompts of an exact token length (ids, or text with a tokenizer), or approximate text without one."""

    def __init__(self, prompt_format: PromptFormat, tokenizer: Tokenizer | None, vocab_size: int | None) -> None:
        self.prompt_format = prompt_format
        self.tokenizer = tokenizer
        self._exact_text: ExactText | None = None
        if prompt_format == "ids":
            if tokenizer is not None:
                special: frozenset[int] = getattr(tokenizer, "special_ids", frozenset())
                self.ids = [i for i in range(tokenizer.vocab_size) if i not in special]
            else:
                if vocab_size is None or vocab_size <= FIRST_RANDOM_ID:
                    raise ValueError(f"token-id prompts need a vocabulary size above {FIRST_RANDOM_ID}")
                self.ids = list(range(FIRST_RANDOM_ID, vocab_size))
        elif tokenizer is not None:
            self._exact_text = ExactText(tokenizer)

    @property
    def exact(self) -> bool:
        return self.prompt_format == "ids" or self._exact_text is not None

    def ids_of(self, rng: random.Random, length: int) -> list[int]:
        return [rng.choice(self.ids) for _ in range(length)]

    def text_of(self, rng: random.Random, length: int, prefix: str = "") -> str:
        if self._exact_text is not None:
            return self._exact_text.make(rng, length, prefix)
        text = approximate_text(rng, length)
        return " " + text if prefix else text

    def make(self, rng: random.Random, length: int) -> str | list[int]:
        return self.ids_of(rng, length) if self.prompt_format == "ids" else self.text_of(rng, length)


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's --random-range-ratio: lengths drawn uniformly from [length*(1-r), length*(1+r)], at least 1."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"the range ratio must be in [0, 1), not {range_ratio}")
    return max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio)))


@dataclass
class RandomDataset:
    """Random prompts of input_len tokens (or drawn around it), each asking for output_len tokens."""

    maker: PromptMaker
    input_len: int
    output_len: int
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        self._inputs = length_range(self.input_len, self.range_ratio)
        self._outputs = length_range(self.output_len, self.range_ratio)

    @property
    def exact(self) -> bool:
        return self.maker.exact

    def generate(self, count: int, seed: int) -> list[RequestSpec]:
        rng = random.Random(seed)
        specs = []
        for _ in range(count):
            input_len, output_len = rng.randint(*self._inputs), rng.randint(*self._outputs)
            specs.append(RequestSpec(self.maker.make(rng, input_len), input_len, output_len))
        return specs

    def describe(self) -> dict[str, Any]:
        return {
            "name": "random",
            "prompt_format": self.maker.prompt_format,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "range_ratio": self.range_ratio,
            "exact_lengths": self.exact,
        }


@dataclass
class SharedPrefixDataset:
    """num_groups groups of prompts; the prompts of a group share their first prefix_len tokens.

    Every prompt is input_len tokens (prefix, then a random suffix); prompts are dealt to the
    groups in turn and then shuffled, so a run interleaves the groups.
    """

    maker: PromptMaker
    num_groups: int
    prefix_len: int
    input_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise ValueError(f"at least one prefix group, not {self.num_groups}")
        if not 0 < self.prefix_len < self.input_len:
            raise ValueError(f"the prefix ({self.prefix_len}) must be shorter than the prompt ({self.input_len})")

    @property
    def exact(self) -> bool:
        return self.maker.exact

    def generate(self, count: int, seed: int) -> list[RequestSpec]:
        rng = random.Random(seed)
        suffix_len = self.input_len - self.prefix_len
        specs = []
        if self.maker.prompt_format == "ids":
            id_prefixes = [self.maker.ids_of(rng, self.prefix_len) for _ in range(self.num_groups)]
            for i in range(count):
                prompt: str | list[int] = id_prefixes[i % self.num_groups] + self.maker.ids_of(rng, suffix_len)
                specs.append(RequestSpec(prompt, self.input_len, self.output_len))
        else:
            text_prefixes = [self.maker.text_of(rng, self.prefix_len) for _ in range(self.num_groups)]
            for i in range(count):
                prefix = text_prefixes[i % self.num_groups]
                specs.append(
                    RequestSpec(prefix + self.maker.text_of(rng, suffix_len, prefix), self.input_len, self.output_len)
                )
        rng.shuffle(specs)
        return specs

    def describe(self) -> dict[str, Any]:
        return {
            "name": "shared-prefix",
            "prompt_format": self.maker.prompt_format,
            "num_groups": self.num_groups,
            "prefix_len": self.prefix_len,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "exact_lengths": self.exact,
        }


@dataclass(frozen=True)
class Conversation:
    prompt: str
    completion: str


HUMAN = frozenset({"human", "user"})
ASSISTANT = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing"})


def _turn(turn: Any) -> tuple[str, str] | None:
    """(role, text) of one ShareGPT turn ({"from", "value"}, or {"role", "content"})."""
    if not isinstance(turn, dict):
        return None
    role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if not isinstance(role, str) or not isinstance(text, str):
        return None
    return role.lower(), text


def parse_sharegpt(entries: Any) -> tuple[list[Conversation], Counter[str]]:
    """The first exchange of each conversation (a human turn, then the assistant's answer), and why others were skipped.

    ShareGPT files are a JSON list of {"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}; "messages" with {"role", "content"} is read too.
    """
    if not isinstance(entries, list):
        raise ValueError("a ShareGPT file is a JSON list of conversations")
    found: list[Conversation] = []
    skipped: Counter[str] = Counter()
    for entry in entries:
        turns = entry.get("conversations", entry.get("messages")) if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            skipped["fewer than two turns"] += 1
            continue
        first, second = _turn(turns[0]), _turn(turns[1])
        if first is None or second is None:
            skipped["malformed turn"] += 1
        elif first[0] not in HUMAN or second[0] not in ASSISTANT:
            skipped["not a human turn then an assistant turn"] += 1
        else:
            found.append(Conversation(first[1], second[1]))
    return found, skipped


@dataclass
class ShareGPTDataset:
    """Prompts and output lengths from real conversations, filtered as vLLM's ShareGPT dataset is.

    Kept: prompts and answers of at least min_len tokens (the answer's length is not checked
    when output_len fixes it), prompts of at most max_prompt_len and prompt + answer of at most
    max_total_len. The conversations are shuffled with the seed; when fewer pass than are asked
    for, they are used again (``repeated`` says how many times over).
    """

    conversations: list[Conversation]
    count_tokens: Callable[[str], int]
    exact: bool
    path: str = ""
    output_len: int | None = None
    min_len: int = 4
    max_prompt_len: int = 1024
    max_total_len: int = 2048
    skipped: Counter[str] = field(default_factory=Counter)  # not a usable conversation at all
    filtered: Counter[str] = field(default_factory=Counter)  # taken out by the length filters
    repeated: float = 0.0  # prompts asked for / conversations kept, at most (above 1: some used again)

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer | None, **options: Any) -> ShareGPTDataset:
        with open(path, encoding="utf-8") as file:
            conversations, skipped = parse_sharegpt(json.load(file))
        if tokenizer is not None:
            encode = tokenizer.encode
            return cls(conversations, lambda text: len(encode(text)), True, str(path), skipped=skipped, **options)
        return cls(conversations, ApproximateCounter().count, False, str(path), skipped=skipped, **options)

    def usable(self, seed: int) -> tuple[list[RequestSpec], Counter[str]]:
        """The conversations that pass the filters, shuffled with the seed, and how many each filter took out."""
        order = list(self.conversations)
        random.Random(seed).shuffle(order)
        specs: list[RequestSpec] = []
        filtered: Counter[str] = Counter()
        for conversation in order:
            prompt_len = self.count_tokens(conversation.prompt)
            output_len = self.output_len or self.count_tokens(conversation.completion)
            if prompt_len < self.min_len or (self.output_len is None and output_len < self.min_len):
                filtered["too short"] += 1
            elif prompt_len > self.max_prompt_len or prompt_len + output_len > self.max_total_len:
                filtered["too long"] += 1
            else:
                specs.append(RequestSpec(conversation.prompt, prompt_len, output_len))
        return specs, filtered

    def generate(self, count: int, seed: int) -> list[RequestSpec]:
        specs, self.filtered = self.usable(seed)
        if not specs:
            raise ValueError(f"no conversation in {self.path or 'the file'} passes the length filters")
        self.repeated = max(self.repeated, count / len(specs))
        return [specs[i % len(specs)] for i in range(count)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": "sharegpt",
            "path": self.path,
            "conversations": len(self.conversations),
            "skipped": dict(self.skipped),
            "filtered": dict(self.filtered),
            "output_len": self.output_len,
            "repeated": round(self.repeated, 3),
            "exact_lengths": self.exact,
        }
