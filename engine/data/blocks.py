"""Blocks of --seq-len tokens read from token files: a range of documents as blocks, the held-out splits, and the
weighted training stream over several sources.

Text documents are packed one after another and cut every seq_len tokens (the run_clm convention: a block may
span documents, as in pretraining). Chat documents get a block each: truncated to seq_len, right-padded, with a
mask of the assistant's tokens. Padding comes after every real token, so under causal attention no real token
sees it: no attention mask is needed, and the loss mask leaves the padding out.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.core.errors import UserError
from engine.data.tokens import TokenFile

PAD = 0  # a token id every vocabulary has; padded positions are never attended to by real tokens nor counted


class Blocks:
    """Documents [first, end) of a token file, less the sorted documents `drop` (training duplicates of held-out
    records), as blocks of `seq_len` tokens (packed text or padded chat)."""

    def __init__(self, file: TokenFile, first: int, end: int, seq_len: int, drop=()):
        self.file, self.first, self.end, self.seq_len = file, first, end, seq_len
        self.drop = np.asarray(drop, np.int64)
        # the kept documents as runs [run_first, run_end) of consecutive ones: the packed text is their tokens in turn
        starts, ends = np.r_[first, self.drop + 1], np.r_[self.drop, end]
        self.run_first, self.run_end = starts[ends > starts], ends[ends > starts]
        self.run_docs = np.r_[0, np.cumsum(self.run_end - self.run_first)]  # kept documents before each run
        self.run_tokens = np.r_[0, np.cumsum([int(file.offsets[z]) - int(file.offsets[a])
                                              for a, z in zip(self.run_first, self.run_end)], dtype=np.int64)]
        self.count = int(self.run_docs[-1]) if file.chat else int(self.run_tokens[-1]) // seq_len

    @property
    def chat(self) -> bool:
        return self.file.chat

    def __len__(self) -> int:
        return self.count

    def take(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, seq_len] int64, mask [n, seq_len] bool: the tokens the loss counts) of blocks `index`."""
        size, tokens = self.seq_len, self.file.tokens
        if not self.chat:
            ids = np.stack([self._packed(b * size, size) for b in index]).astype(np.int64).reshape(len(index), size)
            return ids, np.ones_like(ids, dtype=bool)
        ids, mask = np.full((len(index), size), PAD, np.int64), np.zeros((len(index), size), bool)
        for row, b in enumerate(index):
            d = self._document(b)
            a, z = int(self.file.offsets[d]), int(self.file.offsets[d + 1])
            z = min(z, a + size)
            ids[row, : z - a] = tokens[a:z]
            mask[row, : z - a] = self.file.mask[a:z]
        return ids, mask

    def _packed(self, position: int, size: int) -> np.ndarray:
        """`size` tokens of the kept documents' packed text from `position` on (across runs where it must)."""
        pieces, run = [], int(np.searchsorted(self.run_tokens, position, side="right")) - 1
        while size:
            start = int(self.file.offsets[self.run_first[run]]) + position - int(self.run_tokens[run])
            n = min(size, int(self.run_tokens[run + 1]) - position)
            pieces.append(self.file.tokens[start: start + n])
            position, size, run = position + n, size - n, run + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _document(self, b: int) -> int:
        run = int(np.searchsorted(self.run_docs, b, side="right")) - 1
        return int(self.run_first[run]) + b - int(self.run_docs[run])

    def truncated(self) -> int:
        """Chat documents longer than seq_len (their ends are cut off); packed text loses nothing."""
        return int((self._lengths() > self.seq_len).sum()) if self.chat else 0

    def padding(self) -> int:
        """Padded positions of chat blocks (compute spent on nothing)."""
        return int(np.maximum(self.seq_len - self._lengths(), 0).sum()) if self.chat else 0

    def _lengths(self) -> np.ndarray:
        return np.delete(np.diff(self.file.offsets[self.first: self.end + 1]), self.drop - self.first)


class TensorBlocks:
    """Blocks already in memory, ids [n, seq_len], every token counted (tests and the Python API)."""

    chat = False

    def __init__(self, ids: torch.Tensor):
        self.ids, self.seq_len = ids, ids.shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids[list(index)].numpy().astype(np.int64)
        return ids, np.ones_like(ids, dtype=bool)

    def truncated(self) -> int:
        return 0

    def padding(self) -> int:
        return 0


class Split:
    """A held-out split in memory: ids [n, seq_len] and the loss mask (None: every token counts)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None, truncated: int = 0):
        self.ids, self.mask, self.truncated = ids, mask, truncated  # truncated: chat records cut at seq_len

    @classmethod
    def of(cls, parts: list[tuple[Blocks, int]]) -> "Split":
        """The first n blocks of each (blocks, n)."""
        taken = [blocks.take(range(n)) for blocks, n in parts if n]
        ids = torch.from_numpy(np.concatenate([i for i, _ in taken]))
        mask = torch.from_numpy(np.concatenate([m for _, m in taken]))
        truncated = sum(Blocks(b.file, b.first, b.first + n, b.seq_len).truncated() for b, n in parts if b.chat)
        return cls(ids, mask if any(b.chat for b, _ in parts) else None, truncated)  # text counts every token

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, size: int, rows: slice = slice(None)) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        ids = self.ids[rows].split(size)
        masks = self.mask[rows].split(size) if self.mask is not None else [None] * len(ids)
        return list(zip(ids, masks))


class Mixture:
    """The training stream. Sample i is a block of one source; the sources are interleaved so that each one's
    share of every prefix of the stream is its weight to within a block or so (source s's k-th sample comes at
    time (k + 1/2) / weight_s); a source's blocks come in a seeded permutation per pass over them. The stream is a
    function of the seed alone, so a step's batch is too (resume needs no data-loader state)."""

    def __init__(self, parts: list[Blocks | TensorBlocks], weights: list[float], seed: int):
        self.parts, self.seed = parts, seed
        self.weights = [w / sum(weights) for w in weights]
        self.masked = any(p.chat for p in parts)
        self._sources, self._ranks = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}

    @classmethod
    def of(cls, ids: torch.Tensor, seed: int) -> "Mixture":
        """The stream of one set of blocks in memory [n, seq_len]."""
        return cls([TensorBlocks(ids)], [1.0], seed)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank within its source) of samples [0, n); computed ahead, prefix-stable."""
        if len(self._sources) < n:
            m, extra = max(n, 2 * len(self._sources), 1024), len(self.parts) + 1  # enough of each for m samples
            ranks = [np.arange(int(np.ceil(m * w)) + extra) for w in self.weights]
            times = np.concatenate([(k + 0.5) / w for k, w in zip(ranks, self.weights)])
            sources = np.concatenate([np.full(len(k), s) for s, k in enumerate(ranks)])
            order = np.lexsort((sources, times))[:m]
            self._sources, self._ranks = sources[order], np.concatenate(ranks)[order]
        return self._sources[:n], self._ranks[:n]

    def _block(self, source: int, rank: int) -> int:
        epoch, position = divmod(rank, len(self.parts[source]))
        if self._perms.get(source, (None,))[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch + 1_000_003 * source)
            self._perms[source] = (epoch, torch.randperm(len(self.parts[source]), generator=generator))
        return int(self._perms[source][1][position])

    def take(self, samples: range) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [n, seq_len] and loss mask (None when no source is chat) of stream samples `samples`."""
        sources, ranks = (a[samples.start: samples.stop] for a in self.schedule(samples.stop))
        ids = np.zeros((len(samples), self.parts[0].seq_len), np.int64)
        mask = np.zeros(ids.shape, bool)
        for s in np.unique(sources).tolist():
            rows = np.flatnonzero(sources == s)
            ids[rows], mask[rows] = self.parts[s].take([self._block(s, int(r)) for r in ranks[rows]])
        return torch.from_numpy(ids), torch.from_numpy(mask) if self.masked else None


def token_blocks(ds, tokenizer, seq_len: int, max_blocks: int | None = None, seed: int | None = 0,
                 text_field: str = "text", chunk: int = 256) -> torch.Tensor:
    """Blocks [n, seq_len] packed from the (shuffled, if `seed`) records, tokenised lazily: only what `max_blocks`
    needs (pruning's calibration, the built-in teacher's pretraining)."""
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    buffer: list[int] = []
    blocks: list[list[int]] = []
    for start in range(0, len(ds), chunk):
        texts = [t for t in ds[start: start + chunk][text_field] if t and t.strip()]
        for ids in tokenizer(texts)["input_ids"] if texts else []:
            buffer.extend(ids)
        while len(buffer) >= seq_len:
            blocks.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if max_blocks is not None and len(blocks) >= max_blocks:
            break
    if not blocks:
        raise UserError(f"the data holds fewer than {seq_len} tokens, not one block of --seq-len {seq_len}; "
                        "give more text or a smaller --seq-len")
    return torch.tensor(blocks[:max_blocks], dtype=torch.long)
