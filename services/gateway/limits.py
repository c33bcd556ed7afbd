"""Per-request bounds on what a client may ask for, each one a gateway setting.

Types and ranges that follow from the protocol (a token id fits in 31 bits, an
integer in msgpack's 64) are checked by the request models in protocol.py. The
bounds here are policy: how much work or memory one request may claim. Each is
a ``SCALELLM_*`` setting, and each refusal is a 400 that names the parameter,
the limit and the setting, so a client knows what to change and an operator
knows what to raise. The error codes are OpenAI's for the same refusals.

Pure logic (no I/O); the gateway builds one ``RequestLimits`` from its settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from services.gateway.errors import ApiError, bad_request
from shared.settings import GatewaySettings


def _setting(name: str) -> str:
    return f"SCALELLM_{name.upper()}"


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The bounds; field names are the GatewaySettings fields they come from."""

    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_n: int
    max_batch_prompts: int
    max_top_k: int
    max_logprobs: int
    max_chat_messages: int
    max_prompt_chars: int

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> RequestLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    @classmethod
    def defaults(cls) -> RequestLimits:
        """The settings' defaults, without reading the environment (the defaults are declared once, there)."""
        return cls.from_settings(GatewaySettings.model_construct())

    def check_stop(self, stop: Sequence[str], single: bool) -> None:
        """``single``: the client sent one string rather than a list (the error then names ``stop``)."""
        if len(stop) > self.max_stop_strings:
            raise _refuse(
                "stop",
                f"at most {self.max_stop_strings} stop strings are allowed",
                len(stop),
                "max_stop_strings",
                "array_above_max_length",
            )
        for index, text in enumerate(stop):
            if len(text) > self.max_stop_string_chars:
                raise _refuse(
                    "stop" if single else f"stop[{index}]",
                    f"a stop string may have at most {self.max_stop_string_chars} characters",
                    len(text),
                    "max_stop_string_chars",
                    "string_above_max_length",
                )

    def check_stop_token_ids(self, count: int) -> None:
        if count > self.max_stop_token_ids:
            raise _refuse(
                "stop_token_ids",
                f"at most {self.max_stop_token_ids} stop token ids are allowed",
                count,
                "max_stop_token_ids",
                "array_above_max_length",
            )

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise _refuse("n", f"n may be at most {self.max_n}", n, "max_n", "integer_above_max_value")

    def check_batch(self, prompts: int) -> None:
        if prompts > self.max_batch_prompts:
            raise _refuse(
                "prompt",
                f"at most {self.max_batch_prompts} prompts are allowed in one request",
                prompts,
                "max_batch_prompts",
                "array_above_max_length",
            )

    def check_top_k(self, top_k: int) -> None:
        if top_k > self.max_top_k:
            raise _refuse(
                "top_k", f"top_k may be at most {self.max_top_k}", top_k, "max_top_k", "integer_above_max_value"
            )

    def check_logprobs(self, count: int, param: str) -> None:
        """``param``: ``logprobs`` (completions) or ``top_logprobs`` (chat)."""
        if count > self.max_logprobs:
            raise _refuse(
                param, f"{param} may be at most {self.max_logprobs}", count, "max_logprobs", "integer_above_max_value"
            )

    def check_chat_messages(self, count: int) -> None:
        if count > self.max_chat_messages:
            raise _refuse(
                "messages",
                f"at most {self.max_chat_messages} messages are allowed",
                count,
                "max_chat_messages",
                "array_above_max_length",
            )

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """``chars``: the prompt text's length; for chat, the messages' contents together."""
        if chars > self.max_prompt_chars:
            raise _refuse(
                param,
                f"the prompt may have at most {self.max_prompt_chars} characters",
                chars,
                "max_prompt_chars",
                "string_above_max_length",
            )


def _refuse(param: str, rule: str, got: int, setting: str, code: str) -> ApiError:
    return bad_request(f"Invalid value for '{param}': {rule} ({_setting(setting)}); got {got}.", param, code)
