"""Tool calling in the gateway (issue 10): the request's fields (request.py), the forced-call
grammar and the output parser of each template family (hermes.py), and the OpenAI
``tool_calls`` a choice's output becomes (output.py). The chat template's part, the tools in the
prompt, is the tokenizer stage's (services/tokenizer/tool_prompt.py)."""

from __future__ import annotations

from services.gateway.tools.calls import ToolFormat
from services.gateway.tools.hermes import HermesFormat

# By the name SCALELLM_TOOL_CALL_PARSER takes.
FORMATS: dict[str, ToolFormat] = {HermesFormat.name: HermesFormat()}
