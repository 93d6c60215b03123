"""Fused kernels for MiniDisc (Triton on CUDA, streaming PyTorch elsewhere).

Kept free of side effects at import: other libraries probe a top-level module named `kernels`.
"""
