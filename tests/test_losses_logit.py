"""dkd, dist and standardize of ktfast/losses.py held to float64 from the papers' equations
(tests/logit_reference.py) and to mdistiller's formulation, in value and gradient, at the edge cases:
C = 2, a label probability that rounds to 1 in fp32, constant logits, logits of ±1e4, T from 0.5 to
10, α = 0. fp32 is held to the conditioning bounds derived in the docstrings of ktfast/losses.py,
with u = 2⁻²⁴; the float64 reference to the same bounds at u = 2⁻⁵³. Against another computation, the
sum of the two bounds (each is off the exact value by at most its own)."""

import math

import logit_reference as paper
import numpy as np
import pytest
import torch

from ktfast.losses import dist, dkd, standardize

U32, U64 = 2.0**-24, 2.0**-53
TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 10.0)
WEIGHTS = ((1.0, 8.0), (0.0, 8.0), (1.0, 0.0))


def scenario(name):
    """(z_s, z_t, labels) in fp32, four samples."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    classes = {"two classes": 2, "hundred classes": 100}.get(name, 10)
    z_s, z_t = (3 * torch.randn(4, classes, generator=gen) for _ in range(2))
    y = torch.randint(0, classes, (4,), generator=gen)
    rows = torch.arange(4)
    if name == "label saturated":  # margins of 25 and 20: p_y rounds to 1 in fp32 on both sides
        z_s[rows, y], z_t[rows, y] = z_s.max(1).values + 25, z_t.max(1).values + 20
    if name == "constant":
        z_s[:2], z_t[1:3] = 3.7, -12.3
    if name == "logits of 1e4":
        z_s, z_t = (1e4 * torch.randn(4, classes, generator=gen).sign() for _ in range(2))
        z_t[0] = 1e4 * torch.linspace(-1, 1, classes)
        z_s[1], z_t[2] = -1e4, -1e4  # every class but the label at −1e4: lse_{j≠y} / T ≪ −88
        z_s[1, y[1]], z_t[2, y[2]] = 1e4, 1e4
    return z_s, z_t, y


SCENARIOS = ["random", "two classes", "hundred classes", "label saturated", "constant", "logits of 1e4"]


def std_input_error(z, u):
    """The bound of standardize's docstring on |fl(z') − z'|, per row, in units of z'."""
    c = z.shape[1]
    std = z.std(1, unbiased=True)
    return (2 * math.log2(c) + 6) * u * (z.abs().amax(1) / (1e-7 + std) + math.sqrt(c))


def log_prob_error(z_s, z_t, t, u, standardized):
    """e of dkd's docstring, per row, and M; z_* are float64 and what the loss sees."""
    c = z_s.shape[1]
    seen = [standardize(z) for z in (z_s, z_t)] if standardized else [z_s, z_t]
    m = torch.maximum(seen[0].abs().amax(1), seen[1].abs().amax(1)) / t
    e = (math.log2(c) + 5) * u * (m + math.log(c) + 1)
    if standardized:
        e = e + torch.maximum(std_input_error(z_s, u), std_input_error(z_t, u)) / t
    return e, m, seen


def dkd_bounds(z_s, z_t, t, alpha, beta, u, standardized):
    c = z_s.shape[1]
    e, m, _ = log_prob_error(z_s, z_t, t, u, standardized)
    value = t * t * (alpha + beta) * e * (3 + 4 * m + 2 * math.log(c))
    grad = 4 * t * (alpha + beta) * e
    if standardized:  # through the standardize Jacobian, whose column sums are ≤ (2 + √C) / (1e-7 + std)
        gain = (2 + math.sqrt(c)) / (1e-7 + z_t.std(1, unbiased=True))
        grad = gain * (grad + (2 * math.log2(c) + 6) * u * c * 2 * t * (alpha + beta))
    return value, grad[:, None]


def dist_bound(z_s, z_t, t, u, standardized):
    c = z_s.shape[1]
    e, _, (s, q) = log_prob_error(z_s, z_t, t, u, standardized)
    p_s, p_t = torch.softmax(s / t, 1), torch.softmax(q / t, 1)
    a, b = p_s - p_s.mean(1, keepdim=True), p_t - p_t.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    return (
        t
        * t
        * (
            6 * e * (p_s.norm(dim=1) * nb + na * p_t.norm(dim=1)) / (na * nb + 1e-8)
            + 3 * (math.log2(c) + 4) * u
        )
    )


def per_sample(fn, z_s, z_t, y):
    return torch.tensor(
        [fn(z_s[i].numpy(), z_t[i].numpy(), int(y[i])) for i in range(len(y))], dtype=torch.float64
    )


def loss_and_grad(fn, z_s, z_t):
    z_t = z_t.clone().requires_grad_()
    value = fn(z_s, z_t)
    (grad,) = torch.autograd.grad(value.sum(), z_t)
    return value.detach(), grad


def maybe_std(z, standardized):
    return standardize(z) if standardized else z


def assert_matches_paper(name, standardized, cases):
    """Each case (label, loss(s, q), paper(a, b, k), bounds(z_s, z_t, u) -> (value bound, gradient bound or
    None)): the loss in fp32 and float64 against the float64 implementation of the paper, raw or on
    standardized logits, within the bounds at u = fp32's and float64's unit roundoff."""
    z_s, z_t, y = scenario(name)
    s64, t64 = z_s.double(), z_t.double()
    for where, loss, reference, bounds in cases:
        want = per_sample(
            lambda a, b, k: reference(*[paper.standardize(v) if standardized else v for v in (a, b)], k),
            s64,
            t64,
            y,
        )

        def fn(s, q):
            return loss(maybe_std(s, standardized), maybe_std(q, standardized))

        v32, g32 = loss_and_grad(fn, z_s, z_t)
        v64, g64 = loss_and_grad(fn, s64, t64)
        (b32, gb32), (b64, gb64) = bounds(s64, t64, U32), bounds(s64, t64, U64)
        assert torch.isfinite(v32).all() and torch.isfinite(g32).all(), where
        assert ((v64 - want).abs() <= 2 * b64).all(), (where, v64, want)
        assert ((v32.double() - want).abs() <= b32 + b64).all(), (where, v32, want, b32)
        if gb32 is not None:
            assert ((g32.double() - g64).abs() <= gb32 + gb64).all(), (
                where,
                (g32.double() - g64).abs().max(),
            )


@pytest.mark.parametrize("standardized", [False, True], ids=["raw", "standardized"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_dkd_against_the_paper_in_fp32_and_float64(name, standardized):
    y = scenario(name)[2]
    assert_matches_paper(
        name,
        standardized,
        [
            (
                f"T={t} alpha={alpha} beta={beta}",
                lambda s, q, t=t, alpha=alpha, beta=beta: dkd(s, q, y, t, alpha, beta),
                lambda a, b, k, t=t, alpha=alpha, beta=beta: paper.dkd(a, b, k, t, alpha, beta),
                lambda z_s, z_t, u, t=t, alpha=alpha, beta=beta: dkd_bounds(
                    z_s, z_t, t, alpha, beta, u, standardized
                ),
            )
            for t in TEMPERATURES
            for alpha, beta in WEIGHTS
        ],
    )


@pytest.mark.parametrize("standardized", [False, True], ids=["raw", "standardized"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_dist_against_the_paper_in_fp32_and_float64(name, standardized):
    assert_matches_paper(
        name,
        standardized,
        [
            (
                f"T={t}",
                lambda s, q, t=t: dist(s, q, t),
                lambda a, b, k, t=t: paper.dist(a, b, t),
                lambda z_s, z_t, u, t=t: (dist_bound(z_s, z_t, t, u, standardized), None),
            )
            for t in TEMPERATURES
        ],
    )


def test_dkd_of_two_classes_has_no_nckd():
    z_s, z_t, y = scenario("two classes")
    z_t.requires_grad_()
    for t in TEMPERATURES:
        nckd = dkd(z_s, z_t, y, t, alpha=0.0, beta=8.0)
        (grad,) = torch.autograd.grad(nckd.sum(), z_t)
        assert torch.equal(nckd.detach(), torch.zeros(4)) and torch.equal(grad, torch.zeros_like(grad))
        tckd = dkd(z_s, z_t, y, t, alpha=1.0, beta=0.0)
        both = dkd(z_s, z_t, y, t, alpha=1.0, beta=8.0)
        torch.testing.assert_close(both, tckd, rtol=0, atol=0)  # TCKD is all of DKD at C = 2
        # At C = 2 the binary distribution is the softmax itself: TCKD · T² is KD's KL · T².
        kd = (
            torch.nn.functional.kl_div(
                torch.log_softmax(z_t / t, 1),
                torch.log_softmax(z_s / t, 1),
                reduction="none",
                log_target=True,
            ).sum(1)
            * t
            * t
        )
        torch.testing.assert_close(tckd, kd, rtol=1e-5, atol=1e-6 * t * t)


def test_tckd_stays_exact_where_the_label_probability_rounds_to_one():
    """TCKD = ε_s log(ε_s/ε_t) − ε_s + ε_t + O(ε²), ε = 1 − p_y (here ~1e-10 and ~1e-8): each ε to a
    relative e (dkd's docstring) moves it by ≤ e·(ε_s |log(ε_s/ε_t)| + ε_s + ε_t). A TCKD from
    log p_y = z_y − lse (0 in fp32 here) is off by ε_t − ε_s, 25 times that bound and more."""
    z_s, z_t, y = scenario("label saturated")
    for z in (z_s, z_t):
        assert (torch.softmax(z, 1)[torch.arange(4), y] == 1).all()
    s64, t64 = z_s.double(), z_t.double()
    for t in (1.0, 2.0):  # at larger T the label no longer rounds to 1
        got = dkd(z_s, z_t, y, t, alpha=1.0, beta=0.0).double() / (t * t)
        want = per_sample(lambda a, b, k: paper.dkd_parts(a, b, k, t)[0], s64, t64, y)
        eps = [1 - torch.softmax(z / t, 1)[torch.arange(4), y] for z in (s64, t64)]
        e, _, _ = log_prob_error(s64, t64, t, U32, False)
        bound = e * (eps[0] * (eps[0] / eps[1]).log().abs() + eps[0] + eps[1])
        assert (want > 0).all() and ((got - want).abs() <= bound).all(), (got, want, bound)


def test_constant_logits_standardize_to_exact_zeros_with_finite_gradients():
    for dtype in (torch.float32, torch.float64):
        for value, classes in ((3.7, 7), (-12.3, 100), (0.1, 10), (1e4, 2)):
            z = torch.full((3, classes), value, dtype=dtype, requires_grad=True)
            out = standardize(z)
            assert torch.equal(out.detach(), torch.zeros_like(out)), (dtype, value, classes)
            (grad,) = torch.autograd.grad((out * torch.arange(classes, dtype=dtype)).sum(), z)
            # At std = 0 the map is the centring divided by 1e-7: the std's gradient (0/0) counts as 0.
            # Its backward g − mean(g) sums C terms ≤ C − 1: off by ≤ (log2 C + 3)·u·(C − 1), then / 1e-7.
            # (1e-7 itself is rounded to a relative u, within the same bound.)
            want = (torch.arange(classes, dtype=dtype) - (classes - 1) / 2) / 1e-7
            u = U32 if dtype == torch.float32 else U64
            torch.testing.assert_close(
                grad, want.expand(3, -1), rtol=0, atol=(math.log2(classes) + 3) * u * (classes - 1) / 1e-7
            )
    # Against Sun et al.'s formula in float64 where it is well conditioned.
    z = 4 * torch.randn(5, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(
        standardize(z),
        torch.tensor(np.stack([paper.standardize(r) for r in z.numpy()])),
        rtol=0,
        atol=float(std_input_error(z, U64).max()) * 2,
    )


@pytest.mark.parametrize("t", TEMPERATURES)
def test_dkd_matches_mdistiller_where_its_mask_is_accurate(t):
    """mdistiller's −1000 mask and probability-space sums are exact enough at |z|/T ≤ 30 (e^(−970)
    underflows; p_\\y ≥ e^(−60)): there the two formulations agree to the float64 bound."""
    gen = torch.Generator().manual_seed(int(10 * t))
    z_s, z_t = (
        min(3.0, 30 * t / 4) * torch.randn(6, 10, generator=gen, dtype=torch.float64) for _ in range(2)
    )
    y = torch.randint(0, 10, (6,), generator=gen)
    for alpha, beta in WEIGHTS + ((2.0, 0.5),):
        ours = dkd(z_s, z_t, y, t, alpha, beta)
        theirs = paper.mdistiller_dkd(z_t, z_s, y, alpha, beta, t)  # their student is our target
        b64, _ = dkd_bounds(z_s, z_t, t, alpha, beta, U64, False)
        assert ((ours - theirs).abs() <= 2 * b64).all(), (ours, theirs)
        ours32 = dkd(z_s.float(), z_t.float(), y, t, alpha, beta).double()
        b32, _ = dkd_bounds(z_s, z_t, t, alpha, beta, U32, False)
        assert ((ours32 - theirs).abs() <= b32 + b64).all()


@pytest.mark.parametrize("name", ["random", "two classes", "label saturated"])
def test_gradcheck_in_float64(name):
    z_s, z_t, y = scenario(name)
    z_s, z_t = z_s.double(), z_t.double().requires_grad_()
    for t in (0.5, 4.0):
        for standardized in (False, True):
            assert torch.autograd.gradcheck(
                lambda q: dkd(
                    maybe_std(z_s, standardized), maybe_std(q, standardized), y, t, 0.0 if t < 1 else 1.0
                ),
                (z_t,),
            )
            assert torch.autograd.gradcheck(
                lambda q: dist(maybe_std(z_s, standardized), maybe_std(q, standardized), t), (z_t,)
            )
