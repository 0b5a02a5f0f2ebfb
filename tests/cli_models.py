"""Factories for the CLI tests (importable as ``cli_models:<name>``)."""
import torch
import torch.nn as nn


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace cannot follow it
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.gate(torch.relu(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def untraceable():
    return Untraceable()


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))


mlp.input_shape = (2, 6)
