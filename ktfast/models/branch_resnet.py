"""EKD's compact student (Asif et al., CompNet): N ResNet-8 branches in parallel, logits summed.

The paper gives each branch its own 3×3 stem ("the branch architecture starts with a 3×3
convolution"), and its parameter counts are N times a ResNet-8's (0.08 M for one branch, 0.55 M for
seven), so the branches share nothing: each is a CIFAR ResNet-8, and `branch1_resnet8` is `resnet8`.
"""

import torch
import torch.nn as nn

from ktfast.models.cifar_resnet import CifarResNet


class BranchResNet8(nn.Module):
    """`forward(x, return_attention, return_branches)`: P_s = Σ_i Q_i, then, as asked, the attention
    map and the tuple of branch logits (Q_0, …, Q_{N-1}), which graphs address as `node.b{i}`.

    The attention map is the channel mean of the last stage's feature maps of all branches taken
    together (the mean of the branches' maps, since every branch has 64 channels).
    """

    def __init__(self, branches: int, num_classes: int, image_size: int = 32):
        super().__init__()
        if branches < 1:
            raise ValueError(f"a multi-branch model needs at least one branch, got {branches}")
        self.branches = nn.ModuleList(CifarResNet(8, num_classes, image_size) for _ in range(branches))

    def forward(self, x, return_attention: bool = False, return_branches: bool = False):
        outputs = [
            branch(x, return_attention=True) if return_attention else (branch(x), None)
            for branch in self.branches
        ]
        branch_logits = tuple(z for z, _ in outputs)
        out = (torch.stack(branch_logits).sum(0),)
        if return_attention:
            out += (torch.stack([att for _, att in outputs]).mean(0),)
        if return_branches:
            out += (branch_logits,)
        return out if len(out) > 1 else out[0]
