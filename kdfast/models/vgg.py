"""VGG with batch norm for CIFAR, as the KD tables use it (vgg8, vgg11, vgg13): no fully connected stack.

Five stages of 3x3 conv + BN + ReLU (64, 128, 256, 512, 512 channels; vgg8 one conv a stage, vgg11 1/1/2/2/2, vgg13
two), 2x2 max pooling after the first three stages (at 32 px the fourth keeps its 4x4 map), global average pooling
and one linear layer. The convs have biases, as in the tables' code (their parameter counts include them).
"""
from __future__ import annotations

import torch.nn as nn

from .registry import register_scratch_model

STAGES = {"vgg8": (1, 1, 1, 1, 1), "vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2)}
WIDTHS = (64, 128, 256, 512, 512)


def _stage(in_planes: int, planes: int, convs: int) -> nn.Sequential:
    layers = []
    for i in range(convs):
        layers += [nn.Conv2d(in_planes if i == 0 else planes, planes, 3, padding=1), nn.BatchNorm2d(planes),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    def __init__(self, convs: tuple[int, ...], num_classes: int = 10):
        super().__init__()
        stages, in_planes = [], 3
        for i, (planes, n) in enumerate(zip(WIDTHS, convs)):
            stages.append(_stage(in_planes, planes, n))
            if i < 3:
                stages.append(nn.MaxPool2d(2))
            in_planes = planes
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(WIDTHS[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


for _name, _convs in STAGES.items():
    register_scratch_model(_name, "cnn", f"VGG-{_name[3:]} with BN (CIFAR; KD tables' zoo, no FC stack, {sum(_convs)} "
                           "convs).", lambda n, c=_convs: CifarVGG(c, n))
