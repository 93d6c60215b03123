"""Fused kernels for MiniDisc: Triton on CUDA tensors, streaming PyTorch everywhere else.

Kept free of side effects at import (no Triton, no CUDA): other libraries probe a top-level module
named `kernels`.
"""
from .distill_loss import distill_loss
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .fused_linear_distill import fused_linear_distill_loss
from .fused_linear_token_stats import fused_linear_token_stats
from .masked_pruning import masked_heads, masked_relu, masked_swiglu

__all__ = ["distill_loss", "fused_linear_cross_entropy", "fused_linear_distill_loss", "fused_linear_token_stats",
           "masked_heads", "masked_relu", "masked_swiglu"]
