"""LSTM and GRU language models: token embedding -> stacked nn.LSTM / nn.GRU -> head.

The classic recurrent baseline (Akyürek et al. use a 2-layer LSTM on RegBench). The hidden size
equals the embedding width so the head can share the embedding matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import BaselineConfig, SequenceLM, require

RNN_CELLS = ("lstm", "gru")


@dataclass
class RNNConfig(BaselineConfig):
    cell: str = "lstm"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.cell in RNN_CELLS, self, "cell", f"one of {RNN_CELLS}", self.cell)


class RecurrentStack(nn.Module):
    """n_layer recurrent layers with dropout between them (and after the last one)."""

    def __init__(self, config: RNNConfig):
        super().__init__()
        rnn_class = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn_class(
            input_size=config.n_embd,
            hidden_size=config.n_embd,
            num_layers=config.n_layer,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.drop(out)


class RNNLM(SequenceLM):
    """LSTM or GRU language model (chosen by `config.cell`)."""

    model_type = "rnn"
    config_class = RNNConfig

    def __init__(self, config: RNNConfig):
        super().__init__(config, RecurrentStack(config), final_norm=False)
