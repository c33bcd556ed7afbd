"""The tokenizer's answers to POST /tokenize and POST /detokenize (vLLM's endpoints). No I/O.

The gateway has no tokenizer, so it forwards these requests here over ``{p}:requests``
and waits for the answer on its responses stream, like any other request's output.
The prompt is encoded exactly as a completion's would be (prompt.py), so what /tokenize
shows is what the engine gets. As in vLLM, neither endpoint is held to the context
length: they are for inspecting prompts, including ones that are too long.
"""

from __future__ import annotations

from services.tokenizer.prompt import InvalidRequest, PromptProcessor, failure
from shared.messages import DetokenizeRequest, DetokenizeResult, RequestFailed, TokenizeRequest, TokenizeResult


def tokenize(processor: PromptProcessor, request: TokenizeRequest) -> TokenizeResult | RequestFailed:
    encoder = processor.encoder
    try:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequest("Give either 'prompt' or 'messages'.", "messages")
        if request.messages is not None:
            tokens = encoder.encode_chat(
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                add_special_tokens=request.add_special_tokens,
                chat_template_kwargs=request.chat_template_kwargs,
                tools=request.tools,
            )
        else:
            tokens = encoder.encode_text(request.prompt or "", request.add_special_tokens)
    except InvalidRequest as exc:
        return failure(request.request_id, exc)
    token_strs = (
        [str(t) for t in processor.tokenizer.convert_ids_to_tokens(tokens)] if request.return_token_strs else None
    )
    return TokenizeResult(
        request_id=request.request_id,
        tokens=tokens,
        max_model_len=processor.max_model_len,
        token_strs=token_strs,
    )


def detokenize(processor: PromptProcessor, request: DetokenizeRequest) -> DetokenizeResult | RequestFailed:
    try:
        processor.encoder.check_token_ids(request.tokens, "tokens")
    except InvalidRequest as exc:
        return failure(request.request_id, exc)
    # As vLLM: the tokenizer's plain decode, special tokens included.
    text = processor.tokenizer.decode(list(request.tokens))
    return DetokenizeResult(request_id=request.request_id, prompt=text if isinstance(text, str) else "".join(text))
