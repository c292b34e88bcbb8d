"""The light students of the KD tables' zoo: MobileNetV2 (CIFAR, width 0.5) and ShuffleNet V1 / V2 for 32 px.

As the tables' code defines them (their parameter counts are what tests/test_models.py checks):
- mobilenetv2: width 0.5, expansion 6; a stride-2 3x3 stem (32 -> 16 px), the seven inverted-residual stages of the
  paper with strides 1, 1, 2, 2, 1, 2, 1, where every block keeps its 1x1 expansion conv (the first stage's too, at
  expansion 1), a 1x1 conv to 1280 channels, global average pooling, a linear head.
- shufflenetv1: groups 3, stages of 240/480/960 channels (4, 8, 4 blocks), a 1x1 stem of 24 channels at 32 px; each
  stage's first block has stride 2 and concatenates an average-pooled shortcut; the first 1x1 conv after the stem is
  not grouped.
- shufflenetv2: width 1 (116/232/464 channels, 3/7/3 basic blocks after a down-sampling block), a 1x1 stem of 24
  channels, a 1x1 conv to 1024 channels before pooling.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_scratch_model


def conv_bn(in_planes: int, planes: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_planes, planes, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(planes)]


def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, expand: int):
        super().__init__()
        mid = in_planes * expand
        self.residual = stride == 1 and in_planes == planes
        self.conv = nn.Sequential(*conv_bn(in_planes, mid), nn.ReLU(inplace=True),
                                  *conv_bn(mid, mid, 3, stride, groups=mid), nn.ReLU(inplace=True),
                                  *conv_bn(mid, planes))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))  # (expansion, channels at width 1, blocks, stride of the first)

    def __init__(self, num_classes: int = 10, width: float = 0.5):
        super().__init__()
        planes = int(32 * width)
        layers = [*conv_bn(3, planes, 3, 2), nn.ReLU(inplace=True)]
        for expand, channels, blocks, stride in self.STAGES:
            for b in range(blocks):
                layers.append(InvertedResidual(planes, int(channels * width), stride if b == 0 else 1, expand))
                planes = int(channels * width)
        last = max(1280, int(1280 * width))
        self.features = nn.Sequential(*layers, *conv_bn(planes, last), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, groups: int):
        super().__init__()
        mid, first = planes // 4, 1 if in_planes == 24 else groups
        self.stride, self.first = stride, first
        self.conv1 = nn.Sequential(*conv_bn(in_planes, mid, groups=first))
        self.conv2 = nn.Sequential(*conv_bn(mid, mid, 3, stride, groups=mid))
        self.conv3 = nn.Sequential(*conv_bn(mid, planes, groups=groups))

    def forward(self, x):
        out = shuffle(F.relu(self.conv1(x)), self.first)
        out = self.conv3(F.relu(self.conv2(out)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        layers, in_planes = [*conv_bn(3, 24), nn.ReLU(inplace=True)], 24
        for planes, n in zip(widths, blocks):
            for b in range(n):  # the first block of a stage concatenates its input: it computes the rest
                layers.append(ShuffleV1Block(in_planes, planes - (in_planes if b == 0 else 0), 2 if b == 0 else 1,
                                             groups))
                in_planes = planes
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class ShuffleV2Block(nn.Module):
    """Stride 1: half the channels pass, the other half is transformed; stride 2: both halves of the output are
    computed from the whole input (ShuffleNet V2's down-sampling unit)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        half = planes // 2
        if stride == 2:
            self.left = nn.Sequential(*conv_bn(in_planes, in_planes, 3, 2, groups=in_planes),
                                      *conv_bn(in_planes, half), nn.ReLU(inplace=True))
            src = in_planes
        else:
            self.left, src = None, half
        self.right = nn.Sequential(*conv_bn(src, half), nn.ReLU(inplace=True),
                                   *conv_bn(half, half, 3, stride, groups=half),
                                   *conv_bn(half, half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 2:
            out = torch.cat([self.left(x), self.right(x)], 1)
        else:
            keep, rest = x.chunk(2, dim=1)
            out = torch.cat([keep, self.right(rest)], 1)
        return shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(116, 232, 464), blocks=(3, 7, 3), last: int = 1024):
        super().__init__()
        layers, in_planes = [*conv_bn(3, 24), nn.ReLU(inplace=True)], 24
        for planes, n in zip(widths, blocks):
            layers.append(ShuffleV2Block(in_planes, planes, 2))
            layers += [ShuffleV2Block(planes, planes, 1) for _ in range(n)]
            in_planes = planes
        self.features = nn.Sequential(*layers, *conv_bn(in_planes, last), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _initialized(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


for _name, _cls, _doc in (
        ("mobilenetv2", MobileNetV2, "MobileNetV2 (CIFAR, width 0.5; KD tables' zoo, a light student: lr 0.01 there)."),
        ("shufflenetv1", ShuffleNetV1, "ShuffleNet V1 (groups 3, 32 px; KD tables' zoo, a light student)."),
        ("shufflenetv2", ShuffleNetV2, "ShuffleNet V2 (width 1, 32 px; KD tables' zoo, a light student).")):
    register_scratch_model(_name, "cnn", _doc, lambda n, cls=_cls: _initialized(cls(n)), light=True)
