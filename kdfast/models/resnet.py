"""CNNs: torchvision's ResNet-18 with a CIFAR stem, and the CIFAR ResNets of He et al. (2016, sec. 4.2).

The CIFAR ResNets are one family: kdfast's lab students (resnet8, resnet20: akamaster's naming, one and three blocks a
stage) and the KD tables' zoo (resnet32 ... resnet110, resnet8x4, resnet32x4: RepDistiller's, the CRD and DKD tables)
are the same network with a 1x1-conv shortcut ("B") where the shape changes, and their parameter counts are equal
(tests/test_models.py). They differ only in initialisation (kaiming fan-in here, fan-out there). The x4 models are
four times wider with a 32-channel stem: the tables' ResNet8x4 is not the lab's resnet8.
"""
from __future__ import annotations


import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .library import torchvision_pretrained
from .registry import register_model, register_scratch_model


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
    """ResNet for 32x32 input (He et al. 2016, sec. 4.2): a 3x3 stem, 3 stages of 16/32/64 channels (widths: stem and
    stages, e.g. 32/64/128/256 for the x4 models), global average pooling and a linear head."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, shortcut: str = "B",
                 widths: tuple[int, int, int, int] = (16, 16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x):  # (B, 3, 32, 32) -> (B, widths[3], 8, 8)
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


for _name, _blocks, _widths in (("resnet32", 5, (16, 16, 32, 64)), ("resnet44", 7, (16, 16, 32, 64)),
                                 ("resnet56", 9, (16, 16, 32, 64)), ("resnet110", 18, (16, 16, 32, 64)),
                                 ("resnet8x4", 1, (32, 64, 128, 256)), ("resnet32x4", 5, (32, 64, 128, 256))):
    register_scratch_model(  # the KD tables' CIFAR ResNets (RepDistiller's naming): depth 6 * blocks + 2
        _name, "cnn", f"ResNet-{_name[6:]} (CIFAR; KD tables' zoo, {_blocks} BasicBlock(s) a stage, "
        f"{'/'.join(map(str, _widths[1:]))} channels).",
        lambda n, b=_blocks, w=_widths: CifarResNet(b, n, "B", w))


@register_model("cnn")
def resnet18(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
    """ResNet-18 (torchvision) with the CIFAR stem: 3x3 stride-1 conv1, no max-pool; 11.2M params."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    if pretrained:  # ImageNet weights, but for the 3x3 stem and the head (their shapes differ)
        torchvision_pretrained(model, "resnet18", skip=("conv1.", "fc."))
    return model
