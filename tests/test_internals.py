"""The torch and Optuna internals ktfast/internals.py reads still exist and mean what it takes them
to mean: a torch or Optuna upgrade that changes one fails here, not in a training run."""

import optuna
import torch
from torch import nn

from ktfast.internals import ASHA_RUNG_PREFIX, initial_scale, scaler_tensors, uncompiled, without_asha_rungs


def test_uncompiled_is_the_module_torch_compile_wraps():
    m = nn.Linear(3, 2)
    assert uncompiled(m) is m
    assert uncompiled(torch.compile(m)) is m  # the wrapper only; nothing is compiled before a call


def test_scaler_tensors_are_the_device_scale_and_growth_tracker_it_updates_in_place():
    """Powers of two throughout: every compared value is exact."""
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.0)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=16.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2
    )
    assert scaler_tensors(scaler) == [] and initial_scale(scaler) == 16.0

    def step(grad_factor: float) -> list[float]:
        opt.zero_grad()
        scaler.scale((w * grad_factor).sum()).backward()
        scaler.step(opt)
        scaler.update()
        return [v.item() for v in scaler_tensors(scaler)]

    scaler.scale(w.sum())
    scale, tracker = scaler_tensors(scaler)
    assert scale.item() == scaler.get_scale() == 16.0 and tracker.item() == 0
    assert step(1.0) == [16.0, 1]  # one finite step: the tracker counts it
    assert step(1.0) == [32.0, 0]  # growth_interval finite steps: the scale grows, the tracker restarts
    assert step(float("inf")) == [16.0, 0]  # an overflow: the step is skipped, the scale backs off
    assert scaler_tensors(scaler)[0] is scale and scaler_tensors(scaler)[1] is tracker  # updated in place
    assert initial_scale(scaler) == 16.0


def test_asha_marks_the_rungs_a_trial_passed_with_the_prefix():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    for epoch in (1, 2):
        trial.report(1.0, epoch)
        trial.should_prune()
    attrs = study.trials[0].system_attrs
    assert set(attrs) == {f"{ASHA_RUNG_PREFIX}0", f"{ASHA_RUNG_PREFIX}1"}  # rungs 0 and 1 passed
    assert without_asha_rungs({**attrs, "retry_history": [0]}) == {"retry_history": [0]}
