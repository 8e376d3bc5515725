"""Pure training helpers: losses, schedule, splits, label layout, label maps and Dice."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoseg.errors import AutosegError
from autoseg.training.losses import SegmentationLoss, deep_supervision_weights, soft_dice
from autoseg.labels import label_layout, labels_from_probabilities
from autoseg.masks import dice_per_label
from autoseg.training.splits import make_splits
from autoseg.training.schedule import Schedule
from autoseg.training.trainer import pseudo_dice


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_deep_supervision_weights_halve_and_sum_to_one(n):
    w = deep_supervision_weights(n)
    assert len(w) == n
    assert math.isclose(sum(w), 1.0, rel_tol=1e-12)
    for a, b in zip(w, w[1:]):
        assert math.isclose(b / a, 0.5, rel_tol=1e-12)
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def _labels(shape=(2, 6, 8, 8), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, shape, generator=g)


def test_softmax_loss_perfect_prediction_is_near_minimum_and_wrong_is_larger():
    labels = _labels()
    target = labels[:, None].float()  # (B, 1, ...) label maps, as BatchLoader delivers them
    perfect = F.one_hot(labels, 3).movedim(-1, 1).float() * 30.0  # huge margin: softmax ~ one-hot
    loss_fn = SegmentationLoss(1, batch_dice=True)
    perfect_loss = loss_fn([perfect], [target])
    assert 0 <= float(perfect_loss) < 1e-3  # CE ~ 0 and soft Dice ~ 1
    probs = torch.softmax(perfect, 1)
    onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
    assert float(soft_dice(probs[:, 1:], onehot[:, 1:], True)) == pytest.approx(1.0, abs=1e-6)
    assert float(F.cross_entropy(perfect, labels)) < 1e-6
    wrong = F.one_hot((labels + 1) % 3, 3).movedim(-1, 1).float() * 30.0  # every voxel wrong, confidently
    wrong_loss = loss_fn([wrong], [target])
    assert float(wrong_loss) > 10  # CE ~ 30, Dice ~ 0
    half = loss_fn([perfect * 0.02], [target])  # right, but unsure
    assert float(perfect_loss) < float(half) < float(wrong_loss)


def test_softmax_loss_matches_formula_and_ignores_background_in_dice():
    """Zero logits: CE = ln C, probabilities 1/C; the Dice term covers the foreground channels only."""
    labels = _labels(classes=3, seed=1)
    logits = torch.zeros(2, 3, 6, 8, 8)
    onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
    axes = [0, 2, 3, 4]
    inter = (onehot[:, 1:] / 3).sum(axes)
    n = labels.numel()  # voxels per channel over the batch (batch Dice)
    dice = ((2 * inter + 1e-5) / (onehot[:, 1:].sum(axes) + n / 3 + 1e-5)).mean()
    expected = math.log(3) + 1 - float(dice)
    got = float(SegmentationLoss(1, batch_dice=True)([logits], [labels[:, None].float()]))
    assert got == pytest.approx(expected, rel=1e-5)


def test_batch_dice_differs_from_per_sample_dice():
    """Sample 1 misses its single foreground voxel: per-sample Dice halves, batch Dice barely moves."""
    onehot = torch.zeros(2, 1, 4, 4, 4)
    onehot[0, 0, :2] = 1
    onehot[1, 0, 0, 0, 0] = 1
    probs = onehot.clone()
    probs[1, 0, 0, 0, 0] = 0
    per_sample = float(soft_dice(probs, onehot, batch_dice=False))
    batch = float(soft_dice(probs, onehot, batch_dice=True))
    assert per_sample == pytest.approx(0.5, abs=1e-4)
    assert batch == pytest.approx(2 * 32 / 65, abs=1e-4)


def test_region_loss_uses_sigmoid_and_bce():
    g = torch.Generator().manual_seed(2)
    target = (torch.rand(2, 2, 6, 8, 8, generator=g) > 0.6).float()  # overlapping region channels
    target[:, 1] *= target[:, 0]  # nested, as tumour inside organ
    loss_fn = SegmentationLoss(1, batch_dice=True, regions=True)
    perfect = float(loss_fn([(2 * target - 1) * 30.0], [target]))
    wrong = float(loss_fn([(1 - 2 * target) * 30.0], [target]))
    assert 0 <= perfect < 1e-3
    assert wrong > 10
    # zero logits: BCE = ln 2, sigmoid = 0.5 on every region channel (none is a background channel)
    axes = [0, 2, 3, 4]
    dice = ((2 * 0.5 * target.sum(axes) + 1e-5) / (0.5 * target[:, 0].numel() + target.sum(axes) + 1e-5)).mean()
    zero = float(loss_fn([torch.zeros_like(target)], [target]))
    assert zero == pytest.approx(math.log(2) + 1 - float(dice), rel=1e-5)


@pytest.mark.parametrize("regions", [False, True])
def test_deep_supervision_weighting_and_gradients_flow(regions):
    shapes = [(2, 3, 8, 16, 16), (2, 3, 4, 8, 8), (2, 3, 2, 4, 4)]
    outputs = [torch.randn(s, requires_grad=True) for s in shapes]
    if regions:
        targets = [(torch.rand(s) > 0.5).float() for s in shapes]
    else:
        targets = [torch.randint(0, 3, (s[0], 1, *s[2:])).float() for s in shapes]
    loss_fn = SegmentationLoss(3, batch_dice=False, regions=regions)
    loss = loss_fn(outputs, targets)
    w = deep_supervision_weights(3)
    singles = [loss_fn._single(o, t) for o, t in zip(outputs, targets)]
    assert float(loss.detach()) == pytest.approx(sum(a * float(b.detach()) for a, b in zip(w, singles)), rel=1e-6)
    loss.backward()
    for o in outputs:
        assert o.grad is not None and torch.isfinite(o.grad).all() and o.grad.abs().sum() > 0
    # a gradient step on the logits lowers the loss
    with torch.no_grad():
        stepped = [o - 10.0 * o.grad for o in outputs]
    assert float(loss_fn(stepped, targets)) < float(loss.detach())


def test_loss_works_under_bf16_autocast_outputs():
    labels = _labels()
    logits = torch.randn(2, 3, 6, 8, 8).to(torch.bfloat16).requires_grad_()
    loss = SegmentationLoss(1, batch_dice=True)([logits], [labels[:, None].float()])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


# ------------------------------------------------------------------------------------------- trainer helpers


def test_pseudo_dice_from_counts():
    counts = torch.tensor([[5.0, 0.0, 0.0, 3.0], [1.0, 2.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    d = pseudo_dice(counts)
    assert d[0] == pytest.approx(10 / 15)
    assert d[1] == 0.0  # predicted but never present
    assert math.isnan(d[2])  # never seen nor predicted
    assert d[3] == 1.0


def test_poly_decay_of_the_schedule():
    """The poly decay (formerly ``trainer.poly_lr``) now lives in ``Schedule.lr_at``; same properties."""
    sched = Schedule("sgd", 0.01, 0, 100, "test")
    assert sched.lr_at(0, 0.0) == pytest.approx(0.01)
    assert sched.lr_at(50, 0.5) == pytest.approx(0.01 * 0.5**0.9)
    assert sched.lr_at(100, 1.0) == 0.0
    assert sched.lr_at(100, 1.7) == 0.0  # time budget overshoot never goes negative
    values = [sched.lr_at(10, p) for p in np.linspace(0, 1, 11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_make_splits_folds_are_disjoint_cover_all_and_deterministic():
    ids = [f"case_{i:03d}" for i in range(13)]
    splits = make_splits(ids)
    assert len(splits) == 5
    vals = [s["val"] for s in splits]
    assert sorted(c for v in vals for c in v) == ids  # every case validated exactly once
    assert sorted(len(v) for v in vals) == [2, 2, 3, 3, 3]
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == ids
        assert s["train"] == sorted(s["train"]) and s["val"] == sorted(s["val"])
    assert make_splits(list(reversed(ids))) == splits  # same ids, any order: same splits
    assert make_splits(ids, seed=1) != splits
    assert len(make_splits(ids[:5])) == 5
    with pytest.raises(AutosegError, match="--fold all"):
        make_splits(ids[:4])


PHANTOM_LABELS = {"background": 0, "liver": 1, "liver_tumor": 2, "kidney": 3, "kidney_tumor": 4}


def test_label_layout():
    assert label_layout({"labels": PHANTOM_LABELS}) == (5, None, None)
    regions = {"background": 0, "liver": [1, 2], "liver_tumor": 2, "kidney": [3, 4], "kidney_tumor": 4}
    assert label_layout({"labels": regions, "regions_class_order": [1, 2, 3, 4]}) == (
        4, [[1, 2], [2], [3, 4], [4]], [1, 2, 3, 4])
    with pytest.raises(AutosegError, match="regions_class_order"):
        label_layout({"labels": regions})
    with pytest.raises(AutosegError, match="consecutive"):
        label_layout({"labels": {"background": 0, "liver": 1, "kidney": 3}})


def test_labels_from_probabilities_softmax_and_nested_regions():
    probs = np.zeros((3, 2, 3), dtype=np.float32)
    probs[0] = [[0.6, 0.2, 0.1], [0.3, 0.3, 0.5]]
    probs[1] = [[0.3, 0.7, 0.1], [0.2, 0.6, 0.1]]
    probs[2] = 1 - probs[0] - probs[1]
    seg = labels_from_probabilities(probs, None)
    assert seg.dtype == np.uint8
    assert seg.tolist() == [[0, 1, 2], [2, 1, 0]]
    # regions [[3, 4], [4]] (kidney incl. tumour, tumour) painted in order [3, 4]: the tumour ends on top
    kidney = np.array([[0.9, 0.9, 0.1, 0.4]], dtype=np.float32)
    tumour = np.array([[0.1, 0.8, 0.2, 0.7]], dtype=np.float32)
    seg = labels_from_probabilities(np.stack([kidney, tumour]), [3, 4])
    assert seg.dtype == np.uint8
    assert seg.tolist() == [[3, 4, 0, 4]]


def test_dice_per_label_conventions():
    pred = np.array([0, 1, 1, 2, 0, 0])
    ref = np.array([0, 1, 0, 0, 2, 0])
    d = dice_per_label(pred, ref, [1, 2, 3])
    assert d["1"] == pytest.approx(2 / 3)
    assert d["2"] == 0.0
    assert d["3"] == 1.0  # both empty
    assert dice_per_label(np.zeros(4), np.array([0, 0, 3, 0]), [3]) == {"3": 0.0}  # only the reference has it
    assert dice_per_label(np.array([0, 0, 3, 0]), np.zeros(4), [3]) == {"3": 0.0}  # only the prediction has it
