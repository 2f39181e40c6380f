"""CIFAR ResNets (He et al., 2016): depth 6n+2, three stages of n BasicBlocks, 16/32/64 channels.

The distillation literature's wide pair, resnet8x4 and resnet32x4, is the same network as RepDistiller
defines it (`resnet(depth, num_filters=[32, 64, 128, 256])`): a 32-channel stem, then stages of 64/128/256.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def stem_stride(image_size: int) -> int:
    """The networks are designed for 32 px; a strided stem keeps the last map 8x8 at 64 px."""
    return 2 if image_size > 32 else 1


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int,
        image_size: int = 32,
        stem: int = 16,
        widths: tuple[int, int, int] = (16, 32, 64),
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stem_stride(image_size), 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        stages, cin = [], stem
        for i, width in enumerate(widths):
            blocks = [BasicBlock(cin, width, 1 if i == 0 else 2)] + [
                BasicBlock(width, width, 1) for _ in range(n - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x, return_attention: bool = False):
        features = self.stages(self.stem(x))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        if return_attention:
            return logits, features.mean(1)
        return logits
