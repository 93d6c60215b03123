"""engine.data.hold_out: dev and test cut out of the training data at record boundaries, with a fixed seed."""
from __future__ import annotations

import logging

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from engine.data import HOLDOUT_SHARE, hold_out
from engine.errors import UserError


@pytest.fixture(scope="module")
def records(corpus):
    texts = list(dict.fromkeys(p for p in corpus["train"].read_text().split("\n\n") if p.strip()))[:300]
    return datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def blocks_of(texts, tokenizer, seq_len):
    """The reference: the records' tokens concatenated and cut into whole blocks."""
    ids = [i for text in texts for i in tokenizer(text)["input_ids"]]
    return torch.tensor([ids[i: i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)])


def test_splits_are_whole_records_disjoint_from_training(records, tokenizer):
    splits, texts, train = hold_out(records, tokenizer, 32, {"dev": 8, "test": 12})
    dev, test = set(texts["dev"]), set(texts["test"])
    assert dev and test and not dev & test
    assert len(texts["dev"]) + len(texts["test"]) + len(train) == len(records)  # every record exactly once
    assert not (dev | test) & set(train["text"])
    for name, n in (("dev", 8), ("test", 12)):
        assert torch.equal(splits[name], blocks_of(texts[name], tokenizer, 32)[:n])
        # a split takes records until it has its blocks, not one record more
        assert len(blocks_of(texts[name][:-1], tokenizer, 32)) < n <= len(blocks_of(texts[name], tokenizer, 32))


def test_splits_do_not_depend_on_what_follows_or_on_the_torch_seed(records, tokenizer):
    torch.manual_seed(1)
    first, texts, _ = hold_out(records, tokenizer, 32, {"dev": 8, "test": 12})
    torch.manual_seed(2)
    again, same_texts, _ = hold_out(records, tokenizer, 32, {"dev": 8, "test": 12})
    assert texts == same_texts and all(torch.equal(first[k], again[k]) for k in first)
    alone, dev_texts, _ = hold_out(records, tokenizer, 32, {"dev": 8})  # --test-data given: dev is unchanged
    assert dev_texts["dev"] == texts["dev"] and torch.equal(alone["dev"], first["dev"])


def test_a_split_takes_at_most_a_tenth_of_the_records(records, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="engine.data"):
        splits, texts, train = hold_out(records, tokenizer, 32, {"dev": 10_000, "test": 10_000})
    cap = len(records) // HOLDOUT_SHARE
    assert len(texts["dev"]) == len(texts["test"]) == cap and len(train) == len(records) - 2 * cap
    assert 0 < len(splits["dev"]) < 10_000
    assert "fewer than the 10000 asked for" in caplog.text


def test_too_few_records_is_a_clear_error(tokenizer):
    two = datasets.Dataset.from_dict({"text": ["a long enough paragraph " * 20, "another one " * 20]})
    with pytest.raises(UserError, match=r"has 2 record\(s\): too few to hold out dev and test .* give --dev-data "
                                        "and --test-data"):
        hold_out(two, tokenizer, 32, {"dev": 4, "test": 4})
    short = datasets.Dataset.from_dict({"text": ["tiny"] * 20})
    with pytest.raises(UserError, match="held out for dev .* fewer than --seq-len 32 tokens; give --dev-data"):
        hold_out(short, tokenizer, 32, {"dev": 4})
