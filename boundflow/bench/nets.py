"""Networks the benchmarks build themselves, for shapes ../shared has no file of.

``resnet_2b``: the shape of VNN-COMP 2021's cifar10_resnet resnet_2b (a 3x32x32 input, a
stride-2 conv 3 -> 8, two basic residual blocks, 8 -> 16 with a stride-2 1x1 conv shortcut and
16 -> 16 with an identity one, then fc 1024 -> 100 -> 10), torch's default initialisation
under seed 0 (the VNN-COMP weights are not in ../shared): how many neurons are unstable, and
so the cost of a bound, differs from the trained network's.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + skip)


class ResNet2b(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.blocks = nn.Sequential(_Block(8, 16, 2), _Block(16, 16, 1))
        self.fc1, self.fc2 = nn.Linear(1024, 100), nn.Linear(100, 10)

    def forward(self, x):
        h = self.blocks(F.relu(self.conv(x)))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def resnet_2b(path: Path) -> Path:
    """Write the resnet_2b-shaped network (seed 0) to `path` as ONNX; returns `path`."""
    torch.manual_seed(0)
    module = ResNet2b().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, torch.zeros(1, 3, 32, 32), str(path), dynamo=False, opset_version=17)
    return path
