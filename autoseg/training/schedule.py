"""The optimizer and learning-rate schedule a run can afford, from its iteration budget.

Why: nnU-Net's SGD Nesterov (momentum 0.99, lr 0.01, poly decay) is tuned for 250,000 iterations; in a few hundred
it still predicts only background, while AdamW with a short warm-up reaches organ Dice of about 0.8 in 30
(benchmarks/RESULTS.md). So a run whose budget holds fewer than ``ADAMW_BELOW_ITERS`` iterations trains with AdamW,
a longer one with SGD. The learning rate is set at the start of each epoch (as nnU-Net does, so ``--continue`` with
more epochs replays the same rates) from the run's progress (epochs done or budget time spent, whichever is
further), so a ten-minute run decays as completely as a ten-hour one.

- SGD: nnU-Net's polynomial decay over the whole run.
- AdamW: a linear warm-up over the first ``warmup_iters`` iterations, the initial rate held until
  ``1 - DECAY_FRACTION`` of the run, then a linear decay to zero (warm-up, stable, decay). Why: in a short budget the
  tumours are learned late, after the organs; a polynomial decay has already lowered the rate to a fraction by then
  (0.0003 of 0.003 at 90% of an 11-minute run), and tumours stopped improving, while a run whose rate was still
  0.0017 at the same iteration learned them (benchmarks/RESULTS.md). Holding the rate and decaying only at the end
  gives the late structures the same rate as the early ones, and the final decay still settles the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from ..errors import AutosegError

OPTIMIZERS = ("auto", "sgd", "adamw")
DEFAULT_LR = {"sgd": 1e-2, "adamw": 3e-3}
# Below this many iterations AdamW; at or above it SGD Nesterov. Measured: AdamW is far ahead at 300 and 1,000
# iterations on the demo phantom; nnU-Net's SGD schedule is validated at 250,000. Crossover not measured in between
# on a CPU (a run of 20,000 iterations is ~6 hours here); 20,000 = 80 nnU-Net epochs, where SGD's schedule has room.
ADAMW_BELOW_ITERS = 20_000
WARMUP_FRACTION = 0.05  # AdamW warm-up: 5% of the run, at most WARMUP_MAX_ITERS
WARMUP_MAX_ITERS = 250
WARMUP_START = 0.1  # the warm-up starts at this fraction of the initial learning rate
POLY_EXPONENT = 0.9
# Fewest iterations a 3D configuration needs before it finds tumours on the demo phantom: none at 975, most liver
# lesions at 2,200 (benchmarks/RESULTS.md). A budget that holds fewer trains 2D, whose iteration costs about a quarter
# of a 3D one on a CPU and which, at equal minutes, found more tumours there.
MIN_3D_ITERS = 2500
DECAY_FRACTION = 0.2  # AdamW: the last 20% of the run decays linearly to zero


@dataclass(frozen=True)
class Schedule:
    """Optimizer name, initial learning rate and warm-up, with the iteration estimate and the reason they were chosen."""

    optimizer: str
    initial_lr: float
    warmup_iters: int
    budget_iters: int
    reason: str

    def lr_at(self, iteration: int, progress: float) -> float:
        """Learning rate from ``iteration`` (iterations done) and ``progress`` in [0, 1] of the whole run."""
        if iteration < self.warmup_iters:
            w = (iteration + 1) / self.warmup_iters
            return self.initial_lr * (WARMUP_START + (1 - WARMUP_START) * w)
        progress = min(max(progress, 0.0), 1.0)
        if self.optimizer == "adamw":
            return self.initial_lr * min(1.0, (1 - progress) / DECAY_FRACTION)
        return self.initial_lr * (1 - progress) ** POLY_EXPONENT

    def to_json(self) -> dict:
        return {"optimizer": self.optimizer, "initial_lr": self.initial_lr, "warmup_iters": self.warmup_iters,
                "budget_iters": self.budget_iters, "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict) -> "Schedule":
        """A schedule saved with a checkpoint, checked (a hand-edited or damaged state must not train silently)."""
        try:
            s = cls(str(d["optimizer"]), float(d["initial_lr"]), int(d["warmup_iters"]), int(d["budget_iters"]),
                    str(d.get("reason", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise AutosegError(f"saved schedule {d!r} is incomplete ({e}); start the run again without --continue")
        if s.optimizer not in OPTIMIZERS[1:] or not (math.isfinite(s.initial_lr) and s.initial_lr > 0) or s.warmup_iters < 0:
            raise AutosegError(f"saved schedule {d!r} is not valid; start the run again without --continue")
        return s


def budget_iterations(budget_s: float | None, step_s: float | None, max_iters: int) -> int:
    """Iterations a time budget holds at ``step_s`` seconds each, capped by ``max_iters`` (epochs x iterations)."""
    if budget_s is None or not step_s or step_s <= 0 or not math.isfinite(step_s):
        return max_iters
    return max(1, min(max_iters, int(budget_s / step_s)))


def choose_schedule(total_iters: int, optimizer: str = "auto", lr: float | None = None) -> Schedule:
    """AdamW with warm-up for budgets under ``ADAMW_BELOW_ITERS`` iterations, SGD Nesterov otherwise (pure).

    ``optimizer``/``lr`` given by the user win; the reason says which rule applied.
    """
    if optimizer not in OPTIMIZERS:
        raise AutosegError(f"--optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if total_iters < 1:
        raise AutosegError(f"the run holds {total_iters} iterations; give at least one (check --epochs, "
                           "--iters-per-epoch and --time-budget)")
    if lr is not None and not (math.isfinite(lr) and 0 < lr < 10):
        raise AutosegError(f"--lr {lr} is not a usable learning rate; give a positive number such as "
                           f"{DEFAULT_LR['adamw']} (AdamW) or {DEFAULT_LR['sgd']} (SGD), or leave it out")
    if optimizer == "auto":
        optimizer = "adamw" if total_iters < ADAMW_BELOW_ITERS else "sgd"
        why = (f"{total_iters} iterations {'<' if optimizer == 'adamw' else '>='} {ADAMW_BELOW_ITERS}: "
               f"{'AdamW with warm-up converges in short runs' if optimizer == 'adamw' else 'SGD Nesterov (nnU-Net) for long runs'}")
    else:
        why = f"--optimizer {optimizer} as asked"
    warmup = min(WARMUP_MAX_ITERS, int(WARMUP_FRACTION * total_iters)) if optimizer == "adamw" else 0
    return Schedule(optimizer, DEFAULT_LR[optimizer] if lr is None else float(lr), warmup, int(total_iters), why)


def choose_configuration(iterations: Mapping[str, int], min_3d: int = MIN_3D_ITERS) -> tuple[str, str]:
    """The configuration to train in a fixed budget and why, from the iterations each candidate's budget holds
    (pure): ``3d_fullres`` where its budget holds ``min_3d`` iterations (or ``2d`` was not measured), else ``2d``.

    >>> choose_configuration({"3d_fullres": 420, "2d": 1900})[0]
    '2d'
    >>> choose_configuration({"3d_fullres": 6000, "2d": 20000})[0]
    '3d_fullres'
    """
    if not iterations:
        raise AutosegError("no configuration to choose from; run `autoseg plan_and_preprocess` first")
    n3d, n2d = iterations.get("3d_fullres"), iterations.get("2d")
    if n3d is None or n2d is None:
        name = "3d_fullres" if n3d is not None else "2d" if n2d is not None else sorted(iterations)[0]
        return name, f"{name}: the only candidate measured"
    if n3d >= min_3d:
        return "3d_fullres", (f"3d_fullres: the budget holds {n3d} of its iterations (>= {min_3d}, enough for 3D to "
                              f"learn the tumours; 2d would get {n2d})")
    return "2d", (f"2d: the budget holds {n2d} of its iterations against {n3d} of 3d_fullres, fewer than the "
                  f"{min_3d} 3D needs to learn the tumours")
