"""The built-in example: a corpus every Python ships, a SentencePiece tokenizer, a small LLaMA teacher.

Nothing is downloaded. The corpus is `pydoc_data.topics` (~465 KB of English from the Python docs),
split into train/dev text files. The teacher is randomly initialised for now (a later step pretrains it).
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_TEACHER = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, max_position_embeddings=512)


def write_corpus(directory: Path, dev_fraction: float = 0.05) -> tuple[Path, Path]:
    """train.txt / dev.txt: the pydoc topics, one paragraph per record, blank-line separated."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if p.strip()]
    n_dev = max(1, int(len(paragraphs) * dev_fraction))
    train, dev = directory / "train.txt", directory / "dev.txt"
    train.write_text("\n\n".join(paragraphs[n_dev:]) + "\n")
    dev.write_text("\n\n".join(paragraphs[:n_dev]) + "\n")
    return train, dev


def train_tokenizer(corpus: Path, directory: Path, vocab_size: int = 2000):
    """A SentencePiece BPE model wrapped as a LLaMA tokenizer and saved into `directory`."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=2, minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True)
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_teacher(directory: Path, vocab_size: int, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **DEMO_TEACHER)
    LlamaForCausalLM(config).save_pretrained(directory)


def run_demo(out, calib_samples: int = 16, seq_len: int = 128):
    from .prune import prune

    out = Path(out)
    work = out / "setup"
    work.mkdir(parents=True, exist_ok=True)
    train, _ = write_corpus(work)
    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        log.info("building the demo teacher (LLaMA, %s) and its tokenizer in %s", DEMO_TEACHER, teacher)
        tokenizer = train_tokenizer(train, teacher)
        build_teacher(teacher, len(tokenizer))
    return prune(teacher, train, out / "pruned", calib_samples=calib_samples, seq_len=seq_len)


def pretrain(model, blocks, steps: int, batch_size: int = 16, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train a causal LM on token blocks [n, T] for `steps` AdamW steps (cosine decay); returns the losses.
    Enough to make a small teacher's predictions mean something, so the TA choice is not noise."""
    import torch

    from .progress import progress

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
    model.train()
    losses = []
    for _ in progress(range(steps), "pretraining the teacher"):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
