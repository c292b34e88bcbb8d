"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016): WRN-depth-k of the KD tables' zoo.

Pre-activation blocks (BN, ReLU, conv) in three groups of 16k/32k/64k channels, (depth - 4) / 6 blocks a group, a 1x1
conv shortcut where the width or stride changes (it takes the block's activated input, as the paper's code does), a
final BN and ReLU, global average pooling and a linear head. No dropout (the tables train without it).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_scratch_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if in_planes != planes else None

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (self.shortcut(act) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet's depth is 6n + 4, not {depth}")
        blocks, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        groups, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            groups.append(nn.Sequential(*[WideBlock(in_planes if b == 0 else planes, planes, stride if b == 0 else 1)
                                          for b in range(blocks)]))
            in_planes = planes
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_scratch_model(f"wrn_{_depth}_{_widen}", "cnn",
                           f"WRN-{_depth}-{_widen} (CIFAR Wide ResNet; KD tables' zoo, {(_depth - 4) // 6} blocks a "
                           "group).", lambda n, d=_depth, k=_widen: WideResNet(d, k, n))
