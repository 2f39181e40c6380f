"""ResNet-18 for 224 px images (torchvision's architecture and initialisation), with the layer4 attention map.

A subclass rather than a wrapper, so its state dict has torchvision's keys.
"""
import torch
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self, num_classes: int):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    def forward(self, x, return_attention: bool = False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(torch.flatten(self.avgpool(features), 1))
        if return_attention:
            return logits, features.mean(1)
        return logits
