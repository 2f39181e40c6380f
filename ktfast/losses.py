"""Per-edge losses and gates in plain PyTorch: the reference that defines correctness (docs/ARCHITECTURE.md §1, §8).

Every per-sample loss detaches its source, so the gradient reaches only the target. The fused
Triton kernels in `ktfast.kernels` compute the same functions and are tested against these; this
module imports none of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ktfast.graph import LABEL, Edge, Graph, GraphError, owner

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


def dkd(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
        alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
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
        log_bin = -torch.stack([torch.logaddexp(zero, d), torch.logaddexp(zero, -d)], 1)  # log p_y, log(1 − p_y)
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


# ---- gates -------------------------------------------------------------------------------
def gate(edge: Edge, z_s: torch.Tensor | None, labels: torch.Tensor, step: int, total_steps: int):
    """The per-sample weight of an edge: a scalar or a [B] tensor (docs/ARCHITECTURE.md §1, Gates)."""
    if edge.gate == "through":
        return 1.0
    if edge.gate == "linear":
        return step / total_steps
    if edge.gate == "negative_linear":
        return 1 - step / total_steps
    if edge.gate == "gamma":
        return (step / total_steps) ** (1 / edge.gamma)
    if edge.gate == "negative_gamma":
        return (1 - step / total_steps) ** (1 / edge.gamma)
    if edge.gate == "warmup":
        return min(1.0, step / (edge.warmup * total_steps))
    if edge.gate == "correct":
        if z_s is None:  # the label is always right about itself
            return 1.0
        return (z_s.detach().argmax(1) == labels).float()
    raise ValueError(f"gate {edge.gate!r} is not computed")


def edge_loss(edge: Edge, z_s, z_t, labels, att_s=None, att_t=None) -> torch.Tensor:
    """The ungated per-sample loss of one edge: the sum of its terms ([B])."""
    total = 0.0
    std_s, std_t = (standardize(z_s), standardize(z_t)) if edge.standardize else (z_s, z_t)
    for term in edge.terms:
        if term == "ce":
            total = total + ce(z_t, labels)
        elif term == "kl":
            total = total + kl(std_s, std_t, edge.temperature, edge.soften)
        elif term == "dkd":
            total = total + dkd(std_s, std_t, labels, edge.temperature, edge.alpha, edge.beta)
        elif term == "dist":
            total = total + dist(std_s, std_t, edge.temperature)
        elif term == "cos":
            total = total + cos(z_s, z_t)
        elif term == "mse":
            total = total + mse(z_s, z_t)
        elif term == "att_mse":
            total = total + att_mse(att_s, att_t, edge.crops)
        elif term == "att_cos":
            total = total + att_cos(att_s, att_t, edge.crops)
    return total


# ---- the graph ---------------------------------------------------------------------------
def loss_targets(graph: Graph) -> list[str]:
    """The keys of graph_losses, in file order: nodes with a non-cut-off edge into them or into one
    of their branches. A loss into a branch adds to its node's L_t, since that node is what it
    trains (`Graph.targets` leaves out a node whose edges all go to its branches)."""
    into = {owner(e.target) for e in graph.active_edges}
    return [name for name in graph.nodes if name in into]


def node_logits(graph: Graph, logits: dict) -> dict:
    """Logits of every endpoint: the model nodes and branches given, plus each ensemble node reduced
    from its members (detached when the node says so, so that its losses then train nothing)."""
    out = dict(logits)
    for node in graph.ensemble_nodes:
        members = torch.stack([logits[m] for m in node.members])
        if node.detach:
            members = members.detach()
        out[node.name] = members.mean(0) if node.reduce == "mean" else members.sum(0)
    return out


def graph_losses(graph: Graph, logits: dict, labels, step: int, total_steps: int,
                 attention: dict | None = None) -> dict:
    """{target name: L_t} for every node with a non-cut-off incoming edge (docs/ARCHITECTURE.md §8).

    L_t = Σ_edges→t weight · mean_over_batch(gate · loss_per_sample), the edges into t's branches
    `t.b{i}` included; `logits` holds those branches' logits under their addresses. The fused
    Triton kernels (`ktfast.kernels.fused_graph_losses`) compute the same; the training step
    chooses between the two (`ktfast.step.Step`).
    """
    z = node_logits(graph, logits)
    batch = labels.shape[0]
    losses = {}
    for edge in graph.active_edges:
        z_s = None if edge.source == LABEL else z[edge.source]
        att_s = att_t = None
        if edge.uses_attention:
            if attention is None:
                raise GraphError(f"edges[{edge.source}->{edge.target}]: attention maps are needed")
            att_s, att_t = attention[edge.source], attention[edge.target]
        per_sample = gate(edge, z_s, labels, step, total_steps) * edge_loss(
            edge, z_s, z[edge.target], labels, att_s, att_t)
        # The mean divides by the full batch, also where the correct gate zeroes samples.
        term = edge.weight * per_sample.sum() / batch
        target = owner(edge.target)
        losses[target] = losses[target] + term if target in losses else term
    return {t: losses[t] for t in loss_targets(graph)}


reference_graph_losses = graph_losses  # the name the fused kernels are held to, in tests and benchmarks
