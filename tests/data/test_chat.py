"""Chat records: the assistant mask, padded blocks, the masked loss, and the errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from engine.core.errors import UserError
from engine.data import Blocks, load_records, token_file
from engine.data.blocks import PAD
from engine.data.chat import chat_tokens
from engine.distillation.evaluation import evaluate_widths
from engine.distillation.loss import Objective, teacher_outputs, width_loss

# A template in the Zephyr style whose assistant turns are marked {% generation %}: Hugging Face's own
# assistant mask (return_assistant_tokens_mask) is then the independent reference.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}</s>\n{% endgeneration %}"
            "{% else %}{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What does the with statement do?"},
     {"role": "assistant", "content": "It wraps a block in a context manager's enter and exit."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a tuple?"},
     {"role": "assistant", "content": "An immutable sequence."}, {"role": "user", "content": "And a list?"},
     {"role": "assistant", "content": "A mutable one: items can be appended, removed and replaced in place."}],
    [{"role": "user", "content": "Say nothing."}],
]


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    shutil.copytree(tokenizer_dir, directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer_dir):
    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one turn", "two turns", "no answer"])
def test_the_assistant_mask_equals_the_templates_generation_spans(tokenizer, conversation):
    ids, mask = chat_tokens(tokenizer, conversation)
    reference = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert ids == list(reference["input_ids"]) and mask == list(reference["assistant_masks"])
    assert sum(mask) > 0 or conversation[-1]["role"] != "assistant"


def test_chat_records_become_padded_blocks_with_their_mask(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4))
    ds, field, chat = load_records(str(path))  # no 'text' field: 'messages' is read
    assert (field, chat) == ("messages", True)
    file = token_file(str(path), "text", tokenizer, tmp_path / "cache")
    lengths = [len(chat_tokens(tokenizer, c)[0]) for c in CONVERSATIONS]
    seq_len = sorted(lengths)[1]  # the longest conversation does not fit
    blocks = Blocks(file, 0, len(file), seq_len)
    assert len(blocks) == 12 and blocks.truncated() == 4
    ids, mask = blocks.take(range(12))
    for d in range(12):
        doc = file.tokens[file.offsets[d]: file.offsets[d + 1]].tolist()[:seq_len]
        assert ids[d, : len(doc)].tolist() == doc and (ids[d, len(doc):] == PAD).all()
        assert mask[d, : len(doc)].tolist() == file.mask[file.offsets[d]: file.offsets[d] + len(doc)].tolist()
        assert not mask[d, len(doc):].any()


def test_the_loss_and_the_metrics_count_only_masked_tokens():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    teacher, student = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 4:9], mask[1, 2:6] = True, True  # assistant tokens; the second row is padded after position 7
    ids[1, 8:] = PAD
    losses = width_loss(student, teacher_outputs(teacher, ids), ids, mask, Objective(ce_weight=1.0))
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # position t predicts token t + 1 when that token counts
    logits = student(input_ids=ids).logits[:, :-1]
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(losses["ce"], reference)
    stats = evaluate_widths(student, teacher, [(ids, mask)], [0])
    counted = labels != -100
    accuracy = (logits.argmax(-1) == ids[:, 1:])[counted].float().mean().item()
    assert stats[0]["tokens"] == int(counted.sum()) == 9 and stats[0]["accuracy"] == pytest.approx(accuracy)


def test_chat_data_errors(tmp_path, tokenizer_dir, tokenizer):
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    with pytest.raises(UserError, match="holds chat messages but the tokenizer has no chat template"):
        token_file(str(path), "text", plain, tmp_path / "cache")
    with pytest.raises(UserError, match=r"has no 'conversation' field \(it has \['messages'\]\)"):
        load_records(str(path), "conversation")
    lists = tmp_path / "lists.jsonl"
    lists.write_text(json.dumps({"text": [1, 2, 3]}) + "\n")
    with pytest.raises(UserError, match="holds lists, but not of {role, content} chat messages"):
        load_records(str(lists))
