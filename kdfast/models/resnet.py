"""CNNs: torchvision's ResNet-18 with a CIFAR stem, and the akamaster CIFAR ResNet family."""
from __future__ import annotations


import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .library import torchvision_pretrained
from .registry import register_model


class BasicBlock(nn.Module):
    """akamaster's CIFAR BasicBlock; shortcut 'A' pads channels (no parameters), 'B' is a 1x1 conv."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        self.pad_channels = 0
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.pad_channels = planes // 4
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad_channels:
            p = self.pad_channels
            skip = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))
        else:
            skip = self.shortcut(x)
        return F.relu(out + skip)


class CifarResNet(nn.Module):
    """ResNet for 32x32 input (He et al. 2016, sec. 4.2): 3 stages of 16/32/64 channels."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x):  # (B, 3, 32, 32) -> (B, 64, 8, 8)
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x):
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@register_model("cnn")
def resnet8(num_classes: int = 10, shortcut: str = "B", pretrained: bool = False) -> nn.Module:
    """ResNet-8 (akamaster CIFAR family, one BasicBlock per stage, 16/32/64 channels; 78k params)."""
    if pretrained:
        raise ValueError("resnet8 has no pretrained weights; train it with kdfast.train or kdfast.distill")
    return CifarResNet(1, num_classes, shortcut)


@register_model("cnn")
def resnet20(num_classes: int = 10, shortcut: str = "B", pretrained: bool = False) -> nn.Module:
    """ResNet-20 (akamaster CIFAR family, three BasicBlocks per stage; 0.27M params)."""
    if pretrained:
        raise ValueError("resnet20 has no pretrained weights; train it with kdfast.train")
    return CifarResNet(3, num_classes, shortcut)


@register_model("cnn")
def resnet18(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """ResNet-18 (torchvision) with the CIFAR stem: 3x3 stride-1 conv1, no max-pool; 11.2M params."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    if pretrained:  # ImageNet weights, but for the 3x3 stem and the head (their shapes differ)
        torchvision_pretrained(model, "resnet18", skip=("conv1.", "fc."))
    return model
