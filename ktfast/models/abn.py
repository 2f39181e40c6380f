"""Attention Branch Network on ResNet-18 (Fukui et al., CVPR 2019) as the ensemble knowledge-transfer
graph uses it (Okamoto et al.): the attention map multiplies the features, without ABN's residual.

ResNet-18's first three stages extract features. The attention branch is a stride-1 copy of stage 4
followed by a 1×1 convolution to one response map per class; a 3×3 convolution, BN and a sigmoid
turn those into the attention map. The perception branch (stage 4, pooling, the classifier) reads
features · map: Okamoto et al. drop ABN's `features · (1 + map)` residual so that a change of the
map — what the attention edges act on — reaches the probabilities in full.

ABN also gives its attention branch a classifier of its own (1×1 convolution, global average
pooling), trained by a second cross-entropy. It is left out here:
* a node has one output in the ensemble paper: its logits, the ensemble (Eq. 10) and every edge
  (Eq. 11, 12) use the perception branch's;
* every loss of a graph is an edge the graph can gate or cut off; a cross-entropy hidden in the
  node could be neither, and a graph cannot address a second output of an `abn18` node (branch
  addresses `node.b{i}` belong to the multi-branch models alone);
* without the residual, every loss into the node reaches the attention branch through the
  product, so the map is learnt end to end (and directly by the attention edges).
The response maps stay one per class, as in ABN, so the branch is ABN's up to the map.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from ktfast.models.cifar_resnet import init_weights, stem_stride

LARGE = 64  # images wider than this get the ImageNet stem (7×7 stride-2 conv and max-pool)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Two BasicBlocks, the first changing the width and the stride (ResNet-18's layer)."""
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))


class ABN18(nn.Module):
    """`forward(x, return_attention)`: the perception branch's logits, and the ABN map [B, H, W].

    The map has 1/16 of the image's side with the ImageNet stem (14×14 at 224 px, where the paper's
    3, 7 and 11 crops fit). Small images get a 3×3 stem instead, strided at 64 px as the CIFAR
    networks' is, so 32 and 64 px images give an 8×8 map rather than a 2×2 or 4×4 one.
    """

    def __init__(self, num_classes: int, image_size: int = 32):
        super().__init__()
        if image_size > LARGE:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 3, stem_stride(image_size), 1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            )
        self.features = nn.Sequential(_stage(64, 64, 1), _stage(64, 128, 2), _stage(128, 256, 2))
        self.attention_branch = nn.Sequential(
            _stage(256, 512, 1),
            nn.BatchNorm2d(512),
            nn.Conv2d(512, num_classes, 1, bias=False),
            nn.BatchNorm2d(num_classes),
            nn.ReLU(inplace=True),
        )
        self.attention_map = nn.Sequential(
            nn.Conv2d(num_classes, 1, 3, padding=1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid()
        )
        self.perception_branch = _stage(256, 512, 2)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def forward(self, x, return_attention: bool = False):
        features = self.features(self.stem(x))
        att = self.attention_map(self.attention_branch(features))  # [B, 1, H, W], in (0, 1)
        out = self.perception_branch(features * att)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
        if return_attention:
            return logits, att.squeeze(1)
        return logits
