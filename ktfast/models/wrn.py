"""Wide ResNets (Zagoruyko & Komodakis, 2016): pre-activation blocks, widths 16, 16k, 32k, 64k, no dropout."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ktfast.models.cifar_resnet import init_weights, stem_stride


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # The projection takes the pre-activated input, as in the reference implementation.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, k: int, num_classes: int, image_size: int = 32):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or k < 1:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 and k >= 1, got depth {depth}, k {k}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(3, 16, 3, stem_stride(image_size), 1, bias=False)
        stages, cin = [], 16
        for i, width in enumerate((16 * k, 32 * k, 64 * k)):
            blocks = [WideBlock(cin, width, 1 if i == 0 else 2)] + [
                WideBlock(width, width, 1) for _ in range(n - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        # Pre-activation blocks leave their output un-normalised: the head adds the last BN + ReLU.
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x, return_attention: bool = False):
        features = F.relu(self.bn(self.stages(self.stem(x))))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        if return_attention:
            return logits, features.mean(1)
        return logits
