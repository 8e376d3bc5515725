"""The budget-aware schedule: AdamW with warm-up for short budgets, SGD for long ones, decay that ends at the end."""

import pytest

from autoseg.errors import AutosegError
from autoseg.training.schedule import (
    ADAMW_BELOW_ITERS, DECAY_FRACTION, DEFAULT_LR, MIN_3D_ITERS, Schedule, budget_iterations,
    choose_configuration, choose_schedule,
)


def test_short_budget_gets_adamw_with_warmup():
    # a 10-minute CPU budget at 0.65 s per step
    iters = budget_iterations(600, 0.65, 1000 * 250)
    assert iters == 923
    s = choose_schedule(iters)
    assert s.optimizer == "adamw" and s.initial_lr == DEFAULT_LR["adamw"]
    assert s.warmup_iters == 46  # 5% of the run
    assert s.lr_at(0, 0.0) == pytest.approx(DEFAULT_LR["adamw"] * (0.1 + 0.9 / 46))
    assert s.lr_at(45, 45 / 923) == pytest.approx(DEFAULT_LR["adamw"])
    # stable after the warm-up until the last DECAY_FRACTION of the run, then linear to zero
    assert s.lr_at(46, 46 / 923) == s.lr_at(600, 0.65) == s.initial_lr
    assert s.lr_at(700, 1 - DECAY_FRACTION) == pytest.approx(s.initial_lr)
    assert s.lr_at(830, 0.9) == pytest.approx(s.initial_lr * 0.1 / DECAY_FRACTION)
    assert s.lr_at(923, 1.0) == 0.0
    assert "923 iterations" in s.reason


def test_long_budget_gets_sgd_without_warmup():
    iters = budget_iterations(24 * 3600, 0.25, 1000 * 250)
    s = choose_schedule(iters)
    assert iters >= ADAMW_BELOW_ITERS and s.optimizer == "sgd" and s.warmup_iters == 0
    assert s.lr_at(0, 0.0) == DEFAULT_LR["sgd"]


def test_no_budget_uses_the_epoch_cap_and_progress_drives_the_decay():
    assert budget_iterations(None, 0.5, 5000) == 5000
    assert budget_iterations(600, float("nan"), 5000) == 5000
    s = choose_schedule(5000)
    assert s.lr_at(1000, 0.99) < s.lr_at(1000, 0.9) < s.lr_at(1000, 0.2) == s.lr_at(1000, 0.0) == s.initial_lr
    assert s.lr_at(1000, 1.0) == 0.0 and s.lr_at(1000, 1.7) == 0.0
    sgd = choose_schedule(5000, optimizer="sgd")  # nnU-Net's poly decay over the whole run
    assert sgd.lr_at(1000, 0.5) == pytest.approx(sgd.initial_lr * 0.5**0.9)


def test_saved_schedule_round_trip_and_validation():
    s = choose_schedule(700)
    assert Schedule.from_json(s.to_json()) == s
    for bad in ({}, {**s.to_json(), "optimizer": "lion"}, {**s.to_json(), "initial_lr": "nan"},
                {**s.to_json(), "warmup_iters": -3}):
        with pytest.raises(AutosegError, match="without --continue"):
            Schedule.from_json(bad)


def test_user_choice_wins_and_bad_values_are_refused():
    s = choose_schedule(500, optimizer="sgd", lr=0.05)
    assert (s.optimizer, s.initial_lr, s.warmup_iters) == ("sgd", 0.05, 0)
    assert "as asked" in s.reason
    with pytest.raises(AutosegError, match="--optimizer 'adam'"):
        choose_schedule(500, optimizer="adam")
    for bad in (float("nan"), -1.0, 0.0, float("inf")):
        with pytest.raises(AutosegError, match="not a usable learning rate"):
            choose_schedule(500, lr=bad)
    with pytest.raises(AutosegError, match="at least one"):
        choose_schedule(0)


def test_configuration_for_the_budget():
    # this CPU: 3d_fullres 1.6 s and 2d 0.36 s per iteration in an 11-minute budget
    name, why = choose_configuration({"3d_fullres": 412, "2d": 1833})
    assert name == "2d" and "1833" in why and "412" in why
    # a GPU: the same budget holds thousands of 3D iterations
    assert choose_configuration({"3d_fullres": MIN_3D_ITERS, "2d": 9000})[0] == "3d_fullres"
    assert choose_configuration({"3d_fullres": MIN_3D_ITERS - 1, "2d": 9000})[0] == "2d"
    assert choose_configuration({"3d_fullres": 10})[0] == "3d_fullres"  # nothing else planned
    with pytest.raises(AutosegError, match="plan_and_preprocess"):
        choose_configuration({})


def test_rate_is_set_per_step_so_warmup_and_decay_fit_inside_long_epochs():
    import math
    from autoseg.training.trainer import epoch_rates
    s = choose_schedule(1000)  # a time budget holding four default 250-iteration epochs
    first = epoch_rates(s, 0, 0.0, 1000)
    assert first(0) < first(25) < first(49) == pytest.approx(s.initial_lr)  # warm-up over 50 steps, not an epoch
    last = epoch_rates(s, 750, 0.75, 1000)  # the last epoch starts at 75% of the run, before the decay
    assert last(0) == pytest.approx(s.initial_lr)
    assert last(100) == pytest.approx(s.initial_lr * 0.15 / DECAY_FRACTION)  # 85%: decaying
    assert last(249) < 0.01 * s.initial_lr
    # a run slower than estimated: the budget time already spent at the epoch's start wins
    assert epoch_rates(s, 500, 0.9, 1000)(0) == pytest.approx(s.lr_at(500, 0.9))
    # no time budget: the epochs are the run, the rate holds through an epoch (after the warm-up)
    held = epoch_rates(s, 750, 0.75, math.inf)
    assert held(0) == held(249) == pytest.approx(s.initial_lr)
    assert epoch_rates(s, 0, 0.0, math.inf)(10) < s.initial_lr  # still warming up
