"""Nets of a user's own, for the tests of `model.arch=package.module:factory` (tests/ is on sys.path)."""
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    """A residual block with its dropout inside: h + dropout(tanh(fc(h)))."""

    def __init__(self, units: int, p: float):
        super().__init__()
        self.fc, self.drop = nn.Linear(units, units), nn.Dropout(p)

    def forward(self, h):
        return h + self.drop(torch.tanh(self.fc(h)))


class ResidualMLP(nn.Module):
    """in -> units -> Block -> dropout -> classes; dropouts: block.drop (MC layer 0), drop (layer 1)."""

    def __init__(self, in_features: int, units: int, classes: int, p: float):
        super().__init__()
        self.inp, self.block, self.drop, self.out = (nn.Linear(in_features, units), Block(units, p), nn.Dropout(p),
                                                     nn.Linear(units, classes))

    def forward(self, x):
        return self.out(self.drop(self.block(torch.tanh(self.inp(x.flatten(1))))))


class ChannelNet(nn.Module):
    """conv -> Dropout2d (whole channels) -> linear, inside a Sequential inside a module."""

    def __init__(self, in_channels: int, channels: int, pixels: int, classes: int, p: float):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.Tanh(), nn.Dropout2d(p))
        self.head = nn.Linear(channels * pixels, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def residual_mlp(in_shape, num_classes, p, width=1.0, units=16):
    """A factory as a user writes one: the arguments it names are filled in (in_shape, num_classes, p,
    width), the rest come from model.kwargs."""
    return ResidualMLP(int(torch.Size(in_shape).numel()), max(1, round(units * width)), num_classes, p)


def channel_net(in_shape, num_classes, p, channels=4):
    return ChannelNet(in_shape[0], channels, in_shape[1] * in_shape[2], num_classes, p)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(64, 4), nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(F.dropout(self.drop(x.flatten(1)), 0.3, training=self.training))


def functional_dropout():
    return FunctionalDropout()


def no_dropout(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(in_shape).numel()), num_classes))


def not_a_module():
    return "a string"


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(64, 8), nn.Linear(8, 4), nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(self.drop(x.flatten(1)))[:, :8]))


def shared_dropout():
    return Shared()
