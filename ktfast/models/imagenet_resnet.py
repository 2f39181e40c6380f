"""ResNet-18 for 224 px images (torchvision's architecture), with the layer4 attention map."""
import torch
import torch.nn as nn
import torchvision


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, image_size: int = 224):
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None, num_classes=num_classes)

    def forward(self, x, return_attention: bool = False):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        features = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        logits = n.fc(torch.flatten(n.avgpool(features), 1))
        if return_attention:
            return logits, features.mean(1)
        return logits
