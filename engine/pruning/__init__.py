"""Pruning: importance (sharded over every rank with ZeRO-3), masks, reordering, and `minidisc prune`."""
