"""Greedy continuations of a few prompts by every model of a run, shown side by side in report.md: what
people read first to see whether a compressed model still writes sensibly."""
from __future__ import annotations

import torch

from engine.models.loading import load_causal_lm, load_tokenizer
from engine.training.memory import give_back

DEFAULT_PROMPTS = 3  # prompts taken from the dev split when the user gives none
PROMPT_TOKENS = 16  # their length in tokens


def default_prompts(dev: torch.Tensor) -> list[list[int]]:
    """The opening tokens of the first dev blocks: text from the user's own domain (dev never trains)."""
    length = max(1, min(PROMPT_TOKENS, dev.shape[1] // 2))
    return [block[:length].tolist() for block in dev[:DEFAULT_PROMPTS]]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


@torch.no_grad()
def continuations(model_dir, prompts: list[list[int]], new_tokens: int, device) -> list[str]:
    """The model's greedy continuation of each prompt (token ids), decoded. The model is freed afterwards."""
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad)
        texts.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    del model
    give_back()
    return texts
