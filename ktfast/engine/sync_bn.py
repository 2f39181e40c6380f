"""`--sync-bn` with place data: BatchNorm over the global batch of every rank, on any device."""

import warnings

import torch
from torch import nn
from torch.distributed.nn import functional as with_grad  # collectives that autograd differentiates


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of every rank (`--sync-bn`, place data), on any device:
    torch's SyncBatchNorm takes CUDA tensors only. Training mode: the mean, then the variance
    about it, each summed over the ranks by an all-reduce with autograd (its backward sums the
    ranks' gradients, as the single process's batch statistics would); eval mode is BatchNorm's."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        reduce = with_grad.all_reduce
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = (
            x if x.dtype in (torch.float32, torch.float64) else x.float()
        )  # half precision: statistics in fp32
        count = torch.full((1,), x.numel() / x.shape[1], dtype=xf.dtype, device=x.device)
        with warnings.catch_warnings():  # as in distributed.Placement.exchange
            warnings.simplefilter("ignore", FutureWarning)
            stats = reduce(torch.cat([xf.sum(dims), count]))
            n = stats[-1].detach()
            mean = stats[:-1] / n
            var = reduce((xf - mean.view(shape)).pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by a GlobalBatchNorm holding the same tensors."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        bn = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        bn.load_state_dict(module.state_dict())
        return bn.to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        module.add_module(name, global_batchnorm(child))
    return module
