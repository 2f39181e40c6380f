"""A network of the user's own, for a graph node `"model": "py:tiny_net.py:tiny_net"` (the file is
found beside the graph file). It knows nothing of ktfast: ktfast calls the factory with the number
of classes (and the image size, since it names that keyword), and takes the node's attention map
from the layer the graph names, `"attention": "stage2"`."""

from torch import nn


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.stage1 = block(3, width)  # 32 px -> 16
        self.stage2 = block(width, 2 * width)  # 16 -> 8: the attention map of graph.json
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(x)).mean((2, 3)))


def tiny_net(num_classes: int, image_size: int = 32) -> nn.Module:
    if image_size < 8:
        raise ValueError(f"TinyNet needs images of at least 8 px, not {image_size}")
    return TinyNet(num_classes)
