"""A small nested CNN as a user would write one, for `model.arch=examples.nets:small_cnn`.

A factory gets whichever of in_shape (C, H, W), num_classes, p and width it names, and model.kwargs.
Its dropouts must be nn.Dropout / nn.Dropout2d modules (MC dropout seeds them per image); they may sit
anywhere in the tree. Checkpoints store the import path and kwargs, so the module must be importable
wherever the model is loaded: on every Ray node (put it in your package, or in the job's working dir).
"""
from torch import nn


class ResidualBlock(nn.Module):
    """conv-relu-dropout2d-conv plus the identity."""

    def __init__(self, channels: int, p: float):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Dropout2d(p),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return (x + self.body(x)).relu()


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, p: float, channels: int, hidden: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(channels, p), nn.MaxPool2d(2), ResidualBlock(channels, p))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * channels, hidden), nn.ReLU(),
                                  nn.Dropout(p), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def small_cnn(in_shape, num_classes, p, width=1.0, channels=16, hidden=64):
    """The factory: width scales every layer (a smaller student of the same family)."""
    return SmallCNN(in_shape[0], num_classes, p, max(1, round(channels * width)), max(1, round(hidden * width)))
