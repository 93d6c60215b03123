"""The data path: sources (`sources`) -> token files on disk, tokenised once (`tokens`; chat records through the
chat template, `chat`) -> blocks, held-out splits and the weighted training stream (`blocks`), described per run
(`splits`)."""
from engine.data.blocks import Blocks, Mixture, Split, token_blocks
from engine.data.sources import Source, load_records, load_text_dataset, parse_sources, resolve
from engine.data.tokens import TokenFile, token_cache, token_file

__all__ = ["Blocks", "Mixture", "Split", "Source", "TokenFile", "load_records", "load_text_dataset", "parse_sources",
           "resolve", "token_blocks", "token_cache", "token_file"]
