"""Pruning: which units exist per family, masks and importance, reordering, widths, the pruning plan, and
`minidisc prune`."""
