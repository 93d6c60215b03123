"""Models: the width-switchable supernet, the standalone per-layer HF classes, export, HF checkpoint loading."""
