"""Chat records: a conversation through the tokenizer's chat template, with the mask of the assistant's tokens."""
from __future__ import annotations

from engine.core.errors import UserError


def check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where} holds chat messages but the tokenizer has no chat template: give a tokenizer with "
                        "one (chat_template in tokenizer_config.json or chat_template.jinja) or plain text")
    if not tokenizer.is_fast:
        raise UserError(f"{where} holds chat messages: they need a fast tokenizer (tokenizer.json), for the "
                        "character offsets that place the assistant's tokens")


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a conversation. An assistant turn's tokens are those its rendering adds to
    the conversation before it with the generation prompt, up to the template's end of that turn: what the model
    would generate. Found on the rendered text, then mapped to tokens by their character offsets, so BPE merges at
    a turn's edge cannot shift it. Templates must render each prefix of a conversation as a prefix of it."""
    render = _renderer(tokenizer)
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = (render(messages[:i], True) if i else ""), render(messages[: i + 1], False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise UserError("the tokenizer's chat template does not render a conversation's turns as prefixes of it "
                            "(e.g. it rewrites earlier turns), so the assistant's tokens cannot be told apart; "
                            "render the conversations to plain text")
        spans.append((len(prompt), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def _renderer(tokenizer):
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return render
