"""The modern logit-distillation losses per sample in float64 NumPy, written from the papers' equations
and independent of ktfast/losses.py: the tests hold the reference to these."""

import numpy as np
import torch
import torch.nn.functional as F


def lse(v):
    m = v.max()
    return m + np.log(np.exp(v - m).sum())


def log_softmax(v):
    return v - lse(v)


def kl(log_a, log_b):
    """KL(a ‖ b) from log-probabilities: Σ a (log a − log b)."""
    return float((np.exp(log_a) * (log_a - log_b)).sum())


def standardize(z):
    """Sun et al., CVPR 2024: (z − mean) / (1e-7 + std), std the unbiased one (their code's torch.std)."""
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean()) / (1e-7 + z.std(ddof=1))


def dkd_parts(zs, zt, y, t):
    """Zhao et al., CVPR 2022, Eq. (1)–(5), source = teacher: (TCKD, NCKD) without the T².
    b = (p_y, p_\\y) with p_\\y = Σ_{k≠y} p_k, p̂_k = p_k / p_\\y over k ≠ y; TCKD = KL(b^s ‖ b^t),
    NCKD = KL(p̂^s ‖ p̂^t). In log space, so that p_\\y stays exact where p_y is near 1."""
    out = []
    for z in (np.asarray(zs, np.float64) / t, np.asarray(zt, np.float64) / t):
        log_p = log_softmax(z)
        others = np.delete(log_p, y)
        log_rest = lse(others)  # log p_\y
        out.append((np.array([log_p[y], log_rest]), others - log_rest))
    (bin_s, hat_s), (bin_t, hat_t) = out
    return kl(bin_s, bin_t), kl(hat_s, hat_t)


def dkd(zs, zt, y, t, alpha, beta):
    tckd, nckd = dkd_parts(zs, zt, y, t)
    return (alpha * tckd + beta * nckd) * t * t


def dist(zs, zt, t):
    """Huang et al., NeurIPS 2022, the inter-class relation: 1 − Pearson(softmax(z_s/T), softmax(z_t/T)),
    × T², ε = 1e-8 added to the product of the norms as their code does."""
    ps = np.exp(log_softmax(np.asarray(zs, np.float64) / t))
    pt = np.exp(log_softmax(np.asarray(zt, np.float64) / t))
    a, b = ps - ps.mean(), pt - pt.mean()
    return (1 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)) * t * t


def mdistiller_dkd(z_student, z_teacher, target, alpha, beta, t):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py) per sample: the label masked by −1000
    and the binary probabilities summed in probability space. It is accurate while the label's
    e^(z_y/T − 1000) is negligible beside the other classes' and p_\\y does not underflow: |z|/T ≲ 50."""
    gt = F.one_hot(target, z_student.shape[1]).to(z_student.dtype)
    other = 1 - gt
    p_s, p_t = F.softmax(z_student / t, 1), F.softmax(z_teacher / t, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * other).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * other).sum(1)], 1)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="none").sum(1) * t**2
    p_t2 = F.softmax(z_teacher / t - 1000.0 * gt, 1)
    log_p_s2 = F.log_softmax(z_student / t - 1000.0 * gt, 1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="none").sum(1) * t**2
    return alpha * tckd + beta * nckd
