"""Sources, token files, held-out splits and the weighted training stream (engine.data)."""
from __future__ import annotations

import gzip
import json
import logging
import os

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from engine.core.errors import UserError
from engine.data import Mixture, Source, TokenFile, load_records, parse_sources, token_file, tokens
from engine.data.blocks import TensorBlocks
from engine.data.splits import HOLDOUT_SHARE, describe, held_out_texts, open_data
from engine.data.tokens import DOCUMENT_TOKENS


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def texts(corpus):
    return [json.loads(line)["text"] for line in corpus["jsonl"].read_text().splitlines()]


def fixed_order(n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()


def blocks_of(documents, seq_len):
    """The reference packing: the documents' tokens concatenated and cut into whole blocks."""
    ids = [i for doc in documents for i in doc]
    return torch.tensor([ids[i: i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)])


def documents(file: TokenFile, first=0, end=None):
    end = len(file) if end is None else end
    return [file.tokens[file.offsets[d]: file.offsets[d + 1]].tolist() for d in range(first, end)]


def test_a_token_file_holds_every_record_in_the_fixed_order(tmp_path, corpus, tokenizer, texts):
    file = token_file(str(corpus["jsonl"]), "text", tokenizer, tmp_path / "one")
    assert file.tokens.dtype == np.uint16 and len(file) == len(texts) and not file.chat
    assert documents(file) == [tokenizer(texts[i])["input_ids"] for i in fixed_order(len(texts))]
    # built once: the next call maps the same files; two tokenising processes write the same bytes
    written = os.stat(file.folder / "tokens.bin").st_mtime_ns
    assert token_file(str(corpus["jsonl"]), "text", tokenizer, tmp_path / "one").folder == file.folder
    assert os.stat(file.folder / "tokens.bin").st_mtime_ns == written
    two = token_file(str(corpus["jsonl"]), "text", tokenizer, tmp_path / "two", workers=2)
    assert two.folder.name == file.folder.name
    assert (two.folder / "tokens.bin").read_bytes() == (file.folder / "tokens.bin").read_bytes()
    assert [p.name for p in (tmp_path / "two").iterdir()] == [file.folder.name]  # no scratch, no map cache left


def test_a_changed_file_gets_a_new_token_file(tmp_path, tokenizer, texts):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:50]))
    first = token_file(str(path), "text", tokenizer, tmp_path / "cache")
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:60]))
    second = token_file(str(path), "text", tokenizer, tmp_path / "cache")
    assert first.folder != second.folder and len(second) == 60


def test_sources_read_globs_shards_gz_parquet_csv_and_saved_datasets(tmp_path, texts):
    records = [{"text": t} for t in texts[:90]]
    shards = tmp_path / "shards"
    (shards / "more").mkdir(parents=True)
    with gzip.open(shards / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:30])
    (shards / "more" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[30:]))
    (shards / "README.md").write_text("not data: a folder's other files are skipped")
    table = datasets.Dataset.from_list(records)
    table.to_parquet(tmp_path / "p.parquet")
    table.to_csv(tmp_path / "c.csv", index=False)
    table.save_to_disk(tmp_path / "saved")
    for path in (shards, f"{shards}/**/*.json*", tmp_path / "p.parquet", tmp_path / "c.csv", tmp_path / "saved"):
        ds, field, chat = load_records(str(path))
        assert (field, chat) == ("text", False) and sorted(ds["text"]) == sorted(r["text"] for r in records), path
    gz_only, _, _ = load_records(f"{shards}/*.gz")
    assert gz_only["text"] == [r["text"] for r in records[:30]]


def test_compact_and_recipe_sources():
    assert parse_sources("a.jsonl") == [Source("a.jsonl")]
    assert parse_sources(["web/*.jsonl.gz@0.7", "code.parquet@0.3@content"]) == [
        Source("web/*.jsonl.gz", 0.7), Source("code.parquet", 0.3, "content")]
    assert parse_sources([{"path": "a", "weight": 2, "text_field": "body"}]) == [Source("a", 2.0, "body")]


@pytest.mark.parametrize("spec, message", [
    (["a.jsonl@-1"], "weight -1 must be a positive number"),
    (["a.jsonl@x@y"], "write PATH, PATH@WEIGHT or PATH@WEIGHT@FIELD"),
    ([{"path": "a", "share": 1}], "give the keys path (required), weight and text_field only"),
    ([], "--data is empty"),
])
def test_bad_sources_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sources(spec)


def test_unreadable_sources_name_the_file(tmp_path, texts):
    folder = tmp_path / "shards"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": texts[0]}) + "\n")
    (folder / "b.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"cannot read data file .*b\.jsonl\.gz as json: Not a gzipped file"):
        load_records(str(folder))
    (folder / "b.jsonl.gz").unlink()
    (folder / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="mixes formats"):
        load_records(str(folder))
    with pytest.raises(UserError, match="the pattern matches no file"):
        load_records(str(tmp_path / "*.txt"))
    with pytest.raises(UserError, match=r"has no 'body' field \(it has \['text'\]\)"):
        load_records(f"{folder}/*.gz", "body")


def test_a_large_source_is_tokenised_in_parts_with_progress_lines(tmp_path, corpus, tokenizer, monkeypatch, caplog):
    """Tokenising logs its progress (records, tokens, tokens/s, ETA) part by part; the parts make the same token
    file as one pass."""
    whole = token_file(str(corpus["jsonl"]), "text", tokenizer, tmp_path / "whole")
    monkeypatch.setattr(tokens, "PROGRESS_RECORDS", 64)
    monkeypatch.setattr(tokens, "PROGRESS_S", 0)
    with caplog.at_level(logging.INFO, logger="engine.data.tokens"):
        parts = token_file(str(corpus["jsonl"]), "text", tokenizer, tmp_path / "parts")
    lines = [r.getMessage() for r in caplog.records if " of 400 records (" in r.getMessage()]
    assert [line.split(": ")[1].split(" of ")[0] for line in lines] == ["64", "128", "192", "256", "320", "384", "400"]
    assert "100%" in lines[-1] and "tokens/s, ETA 0 s" in lines[-1]
    for name in ("tokens", "offsets", "hashes"):
        assert np.array_equal(getattr(parts, name)[:], getattr(whole, name)[:]), name


def test_a_corpus_on_one_line_becomes_documents_held_out_by_token_ranges(tmp_path, corpus, tokenizer):
    """A plain-text source that is one record (a book, a dump joined into one line) is split into documents of at
    most DOCUMENT_TOKENS tokens, in order: dev and test are its first token ranges, training the rest."""
    text = " ".join(corpus["train"].read_text().split())
    (tmp_path / "one.txt").write_text(text + "\n")
    file = token_file(str(tmp_path / "one.txt"), "text", tokenizer, tmp_path / "tokens")
    whole = tokenizer(text + "\n")["input_ids"]  # the record as the text loader gives it
    lengths = np.diff(np.asarray(file.offsets[:]))
    assert len(whole) > 4 * DOCUMENT_TOKENS and len(file) == -(-len(whole) // DOCUMENT_TOKENS)
    assert (lengths[:-1] == DOCUMENT_TOKENS).all() and 0 < lengths[-1] <= DOCUMENT_TOKENS
    assert np.array_equal(file.tokens[:], whole)  # the record's tokens, cut and nothing else
    assert file.meta["records"] == 1 and file.meta["records_split"] == 1
    assert len(set(file.hashes[:].tolist())) == len(file)  # its pieces are not duplicates of each other
    described = describe([Source(str(tmp_path / "one.txt"))], {"dev": (None, 4), "test": (None, 4)}, "text",
                         tokenizer, 32, tmp_path / "tokens")
    dev, test, train = described["dev"][0], described["test"][0], described["train"][0]
    assert (dev["first"], dev["end"], test["first"], test["end"], train["first"]) == (0, 1, 1, 2, 2)
    assert "drop" not in train and described["sources"][0]["records_split"] == 1
    decoded = held_out_texts(described, "dev", tmp_path / "tokens", tokenizer)
    assert decoded == [tokenizer.decode(file.tokens[: DOCUMENT_TOKENS], skip_special_tokens=True)]


def test_held_out_splits_are_the_first_whole_documents(tmp_path, corpus, tokenizer, texts):
    torch.manual_seed(1)  # the splits do not depend on the torch seed nor on --seed
    described = describe([Source(str(corpus["jsonl"]))], {"dev": (None, 8), "test": (None, 12)}, "text", tokenizer,
                         32, tmp_path)
    dev, test, train = described["dev"][0], described["test"][0], described["train"][0]
    assert dev["first"] == 0 and dev["end"] == test["first"] and test["end"] == train["first"]
    file = TokenFile(tmp_path / dev["key"])
    torch.manual_seed(2)
    mixture, dev_split, test_split = open_data(described, tmp_path, seed=5)
    for part, split, n in ((dev, dev_split, 8), (test, test_split, 12)):
        docs = documents(file, part["first"], part["end"])
        assert torch.equal(split.ids, blocks_of(docs, 32)[:n]) and split.mask is None
        assert len(blocks_of(docs[:-1], 32)) < n <= len(blocks_of(docs, 32))  # not one document more
    assert len(mixture) == (file.offsets[-1] - file.offsets[train["first"]]) // 32
    order = fixed_order(len(texts))
    expected = [texts[i] for i in order[test["first"]: test["end"]]]
    assert held_out_texts(described, "test", tmp_path, tokenizer) == expected
    alone = describe([Source(str(corpus["jsonl"]))], {"dev": (None, 8), "test": (str(corpus["dev"]), 4)}, "text",
                     tokenizer, 32, tmp_path)
    assert alone["dev"] == described["dev"]  # --test-data given: dev is unchanged
    assert alone["test"][0]["first"] == 0 and alone["train"][0]["first"] == dev["end"]


def test_a_split_takes_at_most_a_tenth_of_the_documents(tmp_path, corpus, tokenizer, texts, caplog):
    with caplog.at_level(logging.INFO, logger="engine.data"):
        described = describe([Source(str(corpus["jsonl"]))], {"dev": (None, 10_000), "test": (None, 10_000)},
                             "text", tokenizer, 32, tmp_path)
    cap = len(texts) // HOLDOUT_SHARE
    assert [(p["first"], p["end"]) for name in ("dev", "test") for p in described[name]] == [(0, cap), (cap, 2 * cap)]
    assert 0 < described["dev"][0]["blocks"] < 10_000 and "fewer than the 10000 asked for" in caplog.text


def test_too_few_or_too_short_records_are_clear_errors(tmp_path, tokenizer):
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"text": "a long enough paragraph " * 20}) + "\n" for _ in range(2)))
    with pytest.raises(UserError, match=r"has 2 record\(s\): too few to hold out dev and test .* give --dev-data"):
        describe([Source(str(two))], {"dev": (None, 4), "test": (None, 4)}, "text", tokenizer, 32, tmp_path)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": "tiny"}) + "\n" for _ in range(20)))
    with pytest.raises(UserError, match="held out for dev .* fewer than --seq-len 32 tokens; give --dev-data"):
        describe([Source(str(short))], {"dev": (None, 4), "test": (str(two), 4)}, "text", tokenizer, 32, tmp_path)


def test_a_mixture_gives_each_source_its_weight_in_every_prefix():
    sizes, weights = (5, 50, 7), (0.5, 0.3, 0.2)
    parts = [TensorBlocks(torch.stack([torch.full((n,), s), torch.arange(n)], 1)) for s, n in enumerate(sizes)]
    ids, mask = Mixture(parts, [w * 10 for w in weights], seed=3).take(range(0, 2000))  # weights are normalised
    assert mask is None
    for n in (10, 100, 1000, 2000):
        counts = torch.bincount(ids[:n, 0], minlength=3)
        assert all(abs(counts[s] - n * w) <= 1 for s, w in enumerate(weights)), (n, counts)
    for s, n in enumerate(sizes):  # each pass over a source shows each of its blocks once, in a new order
        seen = ids[ids[:, 0] == s, 1]
        passes = [sorted(seen[i: i + n].tolist()) for i in range(0, len(seen) - n + 1, n)]
        assert passes and all(p == list(range(n)) for p in passes)
        assert s == 1 or not torch.equal(seen[:n], seen[n: 2 * n])
    again = Mixture(parts, list(weights), seed=3)  # a function of the seed and the sample index alone
    assert torch.equal(again.take(range(1500, 1600))[0], ids[1500:1600])
    assert not torch.equal(Mixture(parts, list(weights), seed=4).take(range(0, 100))[0], ids[:100])


def test_two_sources_split_dev_and_test_by_weight(tmp_path, corpus, tokenizer, texts):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": " ".join(t.split()[::-1])}) + "\n" for t in texts[:200]))
    sources = parse_sources([str(corpus["jsonl"]) + "@3", f"{other}@1@body"])
    described = describe(sources, {"dev": (None, 8), "test": (None, 8)}, "text", tokenizer, 32, tmp_path)
    assert [p["blocks"] for p in described["dev"]] == [6, 2] and [p["blocks"] for p in described["test"]] == [6, 2]
    mixture, dev, _ = open_data(described, tmp_path, seed=0)
    assert mixture.weights == [0.75, 0.25] and len(dev) == 8
    assert [s["field"] for s in described["sources"]] == ["text", "body"]
