"""Wide ResNets (Zagoruyko & Komodakis, 2016): pre-activation blocks, widths 16, 16k, 32k, 64k."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ktfast.models.cifar_resnet import init_weights


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
        assert (depth - 4) % 6 == 0, depth
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.stem = nn.Conv2d(3, widths[0], 3, 2 if image_size > 32 else 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x, return_attention: bool = False):
        features = F.relu(self.bn(self.blocks(self.stem(x))))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        if return_attention:
            return logits, features.mean(1)
        return logits
