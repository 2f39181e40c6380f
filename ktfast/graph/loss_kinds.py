"""The loss kinds, one row each (docs/ARCHITECTURE.md §1, Losses): each kind's per-sample formula in
plain PyTorch, the reference that defines correctness, and what the graph file, the kernels and the
search read of it. A new kind is a row here plus its forward and gradient in `kernels/edge_losses.py`
(or `kernels/attention.py`), keyed by the row's code; tests/test_registry.py holds the table, the
reference and the kernels to each other for every row.

Every per-sample loss detaches its source, so the gradient reaches only the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ktfast.graph.fields import GraphError

NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize
STANDARDIZE_EPS = 1e-7  # as the logit standardization paper's code
DIST_EPS = 1e-8  # as DIST's code


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (AMP) are accumulated in fp32; fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ---- per-sample losses: each returns a [B] tensor -----------------------------------------
def ce(z_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_acc(z_t), labels, reduction="none")


def kl(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 1.0, soften: str = "both") -> torch.Tensor:
    """KL(p_s ‖ p_t). soften "both": of softmax(z / T), times T² so gradients keep their scale
    (Hinton et al.); "source": softmax(z_s / T) against softmax(z_t), no factor (EKD's Eq. 8)."""
    log_p_s = F.log_softmax(_acc(z_s.detach()) / temperature, dim=1)
    if soften == "source":
        return F.kl_div(F.log_softmax(_acc(z_t), dim=1), log_p_s, reduction="none", log_target=True).sum(1)
    log_p_t = F.log_softmax(_acc(z_t) / temperature, dim=1)
    return F.kl_div(log_p_t, log_p_s, reduction="none", log_target=True).sum(1) * temperature**2


def _centre(x: torch.Tensor) -> torch.Tensor:
    """x − mean(x) over the classes, the mean taken of x − x_0 (x_0 the first class's) and added
    back: the same values, but a constant row centres to exact zeros, where fl(mean(x)) may be an
    ulp off x, which a following 1e-7 or 1e-8 in a denominator would blow up to O(1). The shift cancels
    in exact arithmetic, so it is detached: its backward would add the rounded Σ of the centred
    gradient (0 exactly, ~C·u·max otherwise) to the first class."""
    shifted = x - x[:, :1].detach()
    return shifted - shifted.mean(1, keepdim=True)


def standardize(z: torch.Tensor) -> torch.Tensor:
    """(z − mean) / (1e-7 + std) over the classes, std unbiased (Sun et al., CVPR 2024). Constant
    logits give exact zeros (`_centre`; a plain z − mean(z) gave 0.67 for a row of 3.7 at 7 classes
    in fp32): the std's own gradient, 0/0 there, is taken as 0 rather than NaN.

    fp32 against float64 (tests/test_losses_logit.py): the centred values carry ≤ (log2 C + 2)·u·max|z|,
    the std a relative (log2 C + 4)·u, so z' is off by ≤ (2·log2 C + 6)·u·(max|z| / (1e-7 + std) + √C),
    u = 2⁻²⁴: ill-conditioned as std → 0, which is the formula's, not the rounding's."""
    z = _acc(z)
    centred = _centre(z)
    var = centred.pow(2).sum(1, keepdim=True) / (z.shape[1] - 1)
    std = torch.where(var > 0, var, torch.ones_like(var)).sqrt() * (var > 0)
    return centred / (STANDARDIZE_EPS + std)


def dkd(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): α·TCKD + β·NCKD at temperature T, × T².

    TCKD is the KL of the binary distributions (p_y, 1 − p_y); NCKD the KL of the softmax over the
    classes other than y. Everything comes from log-sum-exps: with d = lse_{j≠y} − z_y = log((1 − p_y)
    / p_y), log p_y = −log(1 + e^d) and log(1 − p_y) = −log(1 + e^−d), both to a relative u where p_y
    rounds to 1 (a plain z_y − lse would round to 0 there and TCKD lose its −(1−p_y^s) + (1−p_y^t)).

    fp32 against float64 (tests/test_losses_logit.py), M = max|z| / T over both rows, u = 2⁻²⁴: the
    log-probabilities carry e = (log2 C + 5)·u·(M + log C + 1); the loss then ≤ T²·(α + β)·e·(3 + 4M
    + 2·log C) (a KL is Σ p (ℓ_s − ℓ_t), |ℓ_s − ℓ_t| ≤ 4M + 2 log C) and each gradient element
    ≤ 4·T·(α + β)·e (it is T times differences of probabilities, each to a relative 2e)."""
    y = torch.nn.functional.one_hot(labels, z_t.shape[1]).bool()
    parts = {}
    for name, z in (("s", _acc(z_s.detach()) / temperature), ("t", _acc(z_t) / temperature)):
        lse_other = torch.logsumexp(z.masked_fill(y, -float("inf")), 1)
        d = lse_other - (z * y).sum(1)
        zero = torch.zeros_like(d)
        log_bin = -torch.stack(
            [torch.logaddexp(zero, d), torch.logaddexp(zero, -d)], 1
        )  # log p_y, log(1 − p_y)
        # log of the softmax over j ≠ y; 0 at y, not −lse_other, whose exp overflows (lse_other ≪ 0
        # at logits of ±1e4) and would make the masked product's gradient 0 · inf = NaN.
        log_other = (z - lse_other[:, None]).masked_fill(y, 0.0)
        parts[name] = log_bin, log_other
    (bin_s, other_s), (bin_t, other_t) = parts["s"], parts["t"]
    tckd = (bin_s.exp() * (bin_s - bin_t)).sum(1)
    nckd = (other_s.exp() * (other_s - other_t)).masked_fill(y, 0.0).sum(1)
    return (alpha * tckd + beta * nckd) * temperature**2


def dist(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """DIST's inter-class relation (Huang et al., NeurIPS 2022): 1 − the Pearson correlation of the
    two softmax(z / T) over the classes, × T²; a cosine of the centred vectors, ε added to the
    product of the norms as DIST's code does. Constant logits centre to exact zeros (`_centre`).

    fp32 against float64 (tests/test_losses_logit.py): p carries a relative e (as in `dkd`), the
    centred a, b ≤ 3e·‖p‖, so the loss ≤ T²·(6e·(‖p_s‖‖b‖ + ‖a‖‖p_t‖) / (‖a‖‖b‖ + ε)
    + 3(log2 C + 4)·u):
    the correlation of near-uniform distributions is ill-conditioned, as 1 / ‖a‖ and 1 / ‖b‖."""
    p_s = F.softmax(_acc(z_s.detach()) / temperature, dim=1)
    p_t = F.softmax(_acc(z_t) / temperature, dim=1)
    a, b = _centre(p_s), _centre(p_t)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + DIST_EPS)
    return (1 - corr) * temperature**2


def cos(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the two softmax distributions; minimising it pushes them apart."""
    p_s = F.softmax(_acc(z_s.detach()), dim=1)
    p_t = F.softmax(_acc(z_t), dim=1)
    return (p_s * p_t).sum(1) / (p_s.norm(dim=1) * p_t.norm(dim=1))


def mse(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    return (_acc(z_s.detach()) - _acc(z_t)).pow(2).mean(1)


def attention_crops(att_s: torch.Tensor, att_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k×k windows of both maps around the source map's arg-max, each L2-normalised: [B, k²]."""
    batch, height, width = att_s.shape
    if k > height or k > width:
        raise GraphError(f"crops: crop size {k} is larger than the {height}x{width} attention map")
    flat = att_s.detach().reshape(batch, -1).argmax(1)
    row, col = flat // width, flat % width
    # The window is centred on the arg-max, then moved to lie inside the map.
    top = (row - k // 2).clamp(0, height - k)
    left = (col - k // 2).clamp(0, width - k)
    offsets = torch.arange(k, device=att_s.device)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = (left[:, None] + offsets)[:, None, :]
    b = torch.arange(batch, device=att_s.device)[:, None, None]
    crop_s = _acc(att_s.detach())[b, rows, cols].reshape(batch, -1)
    crop_t = _acc(att_t)[b, rows, cols].reshape(batch, -1)
    return F.normalize(crop_s, dim=1, eps=NORMALIZE_EPS), F.normalize(crop_t, dim=1, eps=NORMALIZE_EPS)


def att_mse(att_s: torch.Tensor, att_t: torch.Tensor, crops=(3, 5)) -> torch.Tensor:
    per_crop = [(a - b).pow(2).mean(1) for a, b in (attention_crops(att_s, att_t, k) for k in crops)]
    return torch.stack(per_crop).mean(0)


def att_cos(att_s: torch.Tensor, att_t: torch.Tensor, crops=(3, 5)) -> torch.Tensor:
    per_crop = [(a * b).sum(1) for a, b in (attention_crops(att_s, att_t, k) for k in crops)]
    return torch.stack(per_crop).mean(0)


# ---- the table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LossKind:
    name: str
    # Its bit in the kernels' term bits: of `kernels/edge_table`'s KIND row for logit kinds, of the
    # attention table's for attention kinds.
    code: int
    # loss(edge, s, t, labels) -> [B]: s, t the source's and the target's attention maps (attention
    # kinds), logits as the edge's tempered terms see them (standardized or not: tempered kinds), or
    # raw logits.
    loss: Callable
    attention: bool = False  # it reads attention maps, not logits
    tempered: bool = False  # it reads `temperature`, and `standardize` changes it
    label: bool = False  # the loss of edges from the label, and their only one


LOSS_KINDS = {
    k.name: k
    for k in (
        LossKind("ce", 1, lambda e, s, t, y: ce(t, y), label=True),
        LossKind("kl", 2, lambda e, s, t, y: kl(s, t, e.temperature, e.soften), tempered=True),
        LossKind("cos", 4, lambda e, s, t, y: cos(s, t)),
        LossKind("mse", 8, lambda e, s, t, y: mse(s, t)),
        LossKind("att_mse", 1, lambda e, s, t, y: att_mse(s, t, e.crops), attention=True),
        LossKind("att_cos", 2, lambda e, s, t, y: att_cos(s, t, e.crops), attention=True),
        LossKind("dkd", 16, lambda e, s, t, y: dkd(s, t, y, e.temperature, e.alpha, e.beta), tempered=True),
        LossKind("dist", 32, lambda e, s, t, y: dist(s, t, e.temperature), tempered=True),
    )
}

LOSS_TERMS = tuple(LOSS_KINDS)
ATTENTION_TERMS = tuple(k.name for k in LOSS_KINDS.values() if k.attention)
TEMPERED_TERMS = tuple(k.name for k in LOSS_KINDS.values() if k.tempered)  # the terms `standardize` changes
LABEL_TERMS = tuple(k.name for k in LOSS_KINDS.values() if k.label)  # the loss of edges from the label
PAIR_TERMS = tuple(k.name for k in LOSS_KINDS.values() if not k.label)  # the terms of node-to-node edges
# "kl, dkd or dist", as messages and help texts list them
TEMPERED_TEXT = f"{', '.join(TEMPERED_TERMS[:-1])} or {TEMPERED_TERMS[-1]}"
