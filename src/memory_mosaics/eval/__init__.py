"""Evaluation: loss, perplexity and loss by token position, with plots."""

from memory_mosaics.eval.metrics import (
    LossResult,
    PerPositionResult,
    evaluate_loss,
    per_position_loss,
    token_losses,
)

__all__ = ["LossResult", "PerPositionResult", "evaluate_loss", "per_position_loss", "token_losses"]
