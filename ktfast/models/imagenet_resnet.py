"""ResNet-18 (torchvision's architecture and initialisation), with the layer4 attention map.

A subclass rather than a wrapper, so its state dict has torchvision's keys.
"""

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet

SMALL = 64  # images this wide or less (CIFAR, Tiny-ImageNet) get the small stem


class ResNet18(ResNet):
    """The ImageNet stem (7×7 stride-2 conv, max-pool) at 224 px. At 64 px and below it would leave
    layer4 a 2×2 map, so there the stem is a 3×3 stride-1 conv without max-pool, the usual
    Tiny-ImageNet adaptation: an 8×8 map at 64 px, 4×4 at 32 px."""

    def __init__(self, num_classes: int, image_size: int = 224):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if image_size <= SMALL:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()

    def forward(self, x, return_attention: bool = False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(torch.flatten(self.avgpool(features), 1))
        if return_attention:
            return logits, features.mean(1)
        return logits
