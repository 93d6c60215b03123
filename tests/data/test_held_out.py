"""Held-out text stays out of training: the built-in corpus shares no paragraph and no 8-word sequence between
dev/test and anything trained on, and user data loses its training duplicates of dev/test records."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from engine.cli.demo import BUILTINS, write_builtin_corpus
from engine.core.errors import UserError
from engine.data import Source, TokenFile
from engine.data.blocks import Blocks
from engine.data.splits import describe, open_data, summary


def words(text: str) -> list[str]:
    return re.findall(r"[0-9a-z_]+", text.lower())


def eight_grams(text: str) -> set[str]:
    w = words(text)
    return {" ".join(w[i:i + 8]) for i in range(len(w) - 7)}


def paragraphs(path) -> list[str]:
    return [p for p in path.read_text().split("\n\n") if p.strip()]


def test_the_builtin_corpus_holds_dev_and_test_out_of_everything_trained_on(tmp_path):
    corpus = write_builtin_corpus(tmp_path, BUILTINS["default"])
    trained = corpus.train.read_text() + "\n\n" + corpus.pool.read_text()  # students, teacher and tokenizer
    trained_grams = eight_grams(trained)
    flat = " ".join(words(trained))
    dev, test = paragraphs(corpus.dev), paragraphs(corpus.test)
    assert len(dev) > 150 and len(test) > 150 and len(paragraphs(corpus.train)) > 600
    assert len(corpus.pool.read_text()) > 10 * len(corpus.train.read_text())  # the teacher knows more
    for held in dev + test:
        assert not eight_grams(held) & trained_grams, held[:80]
        assert " ".join(words(held)) not in flat, held[:80]  # no paragraph inside a training text either
    assert not {g for p in test for g in eight_grams(p)} & {g for p in dev for g in eight_grams(p)}
    assert len(set(map(str.lower, dev + test))) == len(dev + test)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def decoded_training_text(described, root, tokenizer) -> str:
    mixture, _, _ = open_data(described, root, seed=0)
    part = mixture.parts[0]
    return tokenizer.decode(part.take(range(len(part)))[0].flatten().tolist())


def test_training_records_that_duplicate_test_records_are_dropped_and_counted(tmp_path, corpus, tokenizer):
    texts = paragraphs(corpus["train"])[:240]
    test_records = [f"Test record {i}: {t}" for i, t in enumerate(texts[:8])]
    # six of them again, with other spacing and capitals, inside the training data
    copies = [re.sub(" ", "  ", t.upper()) + "\n" for t in test_records[:6]]
    data = write_jsonl(tmp_path / "data.jsonl", texts[6:] + copies)
    test = write_jsonl(tmp_path / "test.jsonl", test_records)
    described = describe([Source(str(data))], {"dev": (None, 4), "test": (str(test), 4)}, "text", tokenizer, 32,
                         tmp_path)
    train = described["train"][0]
    assert train["duplicates"] == 6 and len(train["drop"]) == 6
    file = TokenFile(tmp_path / train["key"])
    kept = [d for d in range(train["first"], train["end"]) if d not in train["drop"]]
    reference = np.concatenate([file.tokens[file.offsets[d]: file.offsets[d + 1]] for d in kept])
    mixture, _, _ = open_data(described, tmp_path, seed=0)
    blocks = mixture.parts[0]
    assert len(blocks) == len(reference) // 32
    assert np.array_equal(blocks.take(range(len(blocks)))[0].flatten(), reference[: len(blocks) * 32])
    text = decoded_training_text(described, tmp_path, tokenizer)
    assert "TEST RECORD" not in text and texts[100][:40] in text
    rows = summary(described, mixture, *open_data(described, tmp_path, seed=0)[1:], steps_blocks=10)["sources"]
    assert rows[0]["duplicates_dropped"] == 6


def test_a_held_out_split_that_is_all_training_text_is_refused(tmp_path, corpus, tokenizer):
    texts = paragraphs(corpus["train"])[:200]
    data = write_jsonl(tmp_path / "data.jsonl", texts)
    test = write_jsonl(tmp_path / "test.jsonl", texts[50:60])
    with pytest.raises(UserError, match=r"--test-data .*test.jsonl: all 10 of its records also occur in the "
                                        r"training text of --data; .* give other dev/test text"):
        describe([Source(str(data))], {"dev": (None, 4), "test": (str(test), 4)}, "text", tokenizer, 32, tmp_path)
    twice = write_jsonl(tmp_path / "twice.jsonl", texts + texts)  # every held-out record is repeated in training
    with pytest.raises(UserError, match="the dev records held out of --data: all .* also occur in the training text"):
        describe([Source(str(twice))], {"dev": (None, 4), "test": (str(test), 4)}, "text", tokenizer, 32, tmp_path)


def test_a_training_set_emptied_by_deduplication_is_refused(tmp_path, corpus, tokenizer):
    texts = paragraphs(corpus["train"])[:100]
    data = write_jsonl(tmp_path / "data.jsonl", texts[:60] + ["One short record of its own."])
    dev = write_jsonl(tmp_path / "dev.jsonl", texts[:30] + ["A dev record of its own. " * 10])
    test = write_jsonl(tmp_path / "test.jsonl", texts[30:60] + ["A test record of its own. " * 10])
    with pytest.raises(UserError, match=r"--data .*data.jsonl: no training block of --seq-len 512 tokens is left "
                                        "after holding out dev and test and dropping its duplicates"):
        describe([Source(str(data))], {"dev": (str(dev), 4), "test": (str(test), 4)}, "text", tokenizer, 512,
                 tmp_path)


@pytest.mark.parametrize("drop", [[], [0], [3, 4, 5], [1, 7, 8, 11], [11]])
def test_blocks_without_dropped_documents_equal_the_packed_rest(tmp_path, corpus, tokenizer, drop):
    texts = paragraphs(corpus["train"])[:12]
    file = TokenFile(describe_only(tmp_path, texts, tokenizer))
    kept = [d for d in range(len(file)) if d not in drop]
    stream = np.concatenate([file.tokens[file.offsets[d]: file.offsets[d + 1]] for d in kept])
    blocks = Blocks(file, 0, len(file), 16, drop)
    assert len(blocks) == len(stream) // 16
    ids, mask = blocks.take(list(range(len(blocks)))[::-1])
    assert np.array_equal(ids[::-1].flatten(), stream[: len(blocks) * 16]) and mask.all()


def describe_only(root, texts, tokenizer):
    from engine.data import token_file

    return token_file(str(write_jsonl(root / "few.jsonl", texts)), "text", tokenizer, root).folder


def test_chat_blocks_skip_dropped_conversations(tmp_path, tokenizer_dir):
    from engine.data import token_file

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}"
                               "{% generation %}{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['content'] }}"
                               "</s>{% endif %}{% endfor %}")
    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(10)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    file = token_file(str(path), "text", tokenizer, tmp_path)
    whole, dropped = Blocks(file, 0, 10, 64), Blocks(file, 0, 10, 64, [2, 3, 9])
    assert len(dropped) == 7
    ids, _ = whole.take(range(10))
    kept_ids, _ = dropped.take(range(7))
    assert torch.equal(torch.from_numpy(kept_ids), torch.from_numpy(ids[[0, 1, 4, 5, 6, 7, 8]]))
