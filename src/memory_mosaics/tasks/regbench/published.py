"""Published RegBench numbers, read off Memory Mosaics' Fig. 9 (`ICLL/figure/dfa_tvd.png`), whose
baseline curves are Akyürek et al.'s. Values marked '~' in the reference notes are approximate
readings of the figure. TVD here is the benchmark's summed L1 distance (no 1/2 factor).
"""

from __future__ import annotations

TRAIN_DFAS = (100, 500, 1000, 2500, 40000)

# name -> (accuracy at TRAIN_DFAS, tvd at TRAIN_DFAS)
PUBLISHED: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "Memory Mosaic": ((0.925, 0.929, 0.934, 0.941, 0.959), (0.569, 0.254, 0.215, 0.185, 0.122)),
    "Transformer": ((0.523, 0.543, 0.534, 0.925, 0.951), (0.685, 0.64, 0.63, 0.232, 0.144)),
    "Mamba": ((0.38, 0.578, 0.716, 0.866, 0.915), (0.754, 0.605, 0.484, 0.34, 0.271)),
    "Linear Transformer": ((0.466, 0.485, 0.51, 0.797, 0.91), (0.75, 0.643, 0.63, 0.340, 0.19)),
    "Hyena": ((0.50, 0.578, 0.656, 0.766, 0.92), (0.702, 0.599, 0.540, 0.458, 0.220)),
    "H3": ((0.440, 0.504, 0.553, 0.670, 0.891), (0.73, 0.66, 0.617, 0.513, 0.237)),
    "LSTM": ((0.424, 0.49, 0.51, 0.625, 0.806), (0.734, 0.666, 0.62, 0.533, 0.363)),
    "RWKV": ((0.401, 0.478, 0.477, 0.555, 0.858), (0.73, 0.66, 0.661, 0.60, 0.281)),
    "S4": ((0.500, 0.533, 0.516, 0.543, 0.822), (0.682, 0.631, 0.633, 0.602, 0.337)),
    "RetNet": ((0.375, 0.481, 0.51, 0.56, 0.82), (0.77, 0.63, 0.66, 0.61, 0.179)),
    "GLA": ((0.354, 0.464, 0.520, 0.521, 0.927), (0.776, 0.694, 0.653, 0.617, 0.187)),
}

# Our model names -> the published family they correspond to (GRU has no published curve).
PUBLISHED_NAME = {
    "mosaic": "Memory Mosaic",
    "transformer": "Transformer",
    "mamba": "Mamba",
    "lstm": "LSTM",
    "gla": "GLA",
    "retnet": "RetNet",
    "s4d": "S4",
    "hyena": "Hyena",
}


def published(model: str, num_train_dfas: int) -> tuple[float, float] | None:
    """(accuracy, tvd) published for our `model` at `num_train_dfas`, or None if there is none."""
    family = PUBLISHED_NAME.get(model)
    if family is None or num_train_dfas not in TRAIN_DFAS:
        return None
    acc, tvd = PUBLISHED[family]
    i = TRAIN_DFAS.index(num_train_dfas)
    return acc[i], tvd[i]
