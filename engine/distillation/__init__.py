"""Distillation: the per-width loss, the sandwich step and one-pass evaluation, the lambda-trade-off TA choice."""
