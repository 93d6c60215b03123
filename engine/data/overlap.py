"""Held-out text must not occur in training text: exact duplicates by a hash of the normalised record, and shared
word sequences (n-grams) for the built-in corpus.

Normalised text: Unicode NFKC, case-folded, whitespace runs collapsed. So a record copied with other line breaks,
spacing or capitals is the same record; a record that differs by a word is not (near-duplicates are not removed from
user data: see docs/data.md).
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata

WORD = re.compile(r"\w+")
NGRAM = 8  # a shared 8-word sequence is a shared passage, not a shared phrase (as in GPT-3's contamination study)


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def record_hash(record) -> int:
    """A 63-bit hash of a record: its normalised text, or for a conversation ([{role, content}]) its normalised
    messages (0 for an empty record, which is never a duplicate of anything)."""
    if not record:
        return 0
    if isinstance(record, str):
        text = normalise(record)
    else:
        text = json.dumps([[m.get("role"), normalise(str(m.get("content") or ""))] for m in record])
    if not text:
        return 0
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1 or 1


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of the text's n-word sequences (words: runs of letters and digits, case-folded)."""
    words = WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}
