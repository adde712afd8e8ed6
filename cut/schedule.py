"""The official learning-rate policies, per epoch, with a state that resumes them exactly.

The official code builds one torch scheduler per optimizer (``models/networks.py`` ``get_scheduler``)
and steps it once at the end of every epoch (``models/base_model.py`` ``update_learning_rate``); see
docs/official-reference.md §3 and §17. ``LRSchedule`` follows the same arithmetic as those torch
schedulers, in the same order of operations, so its rates equal theirs bit for bit; unlike them it
holds nothing but plain numbers, which a checkpoint saves and a resumed run restores.
"""

from __future__ import annotations

import math
from typing import Any

LR_POLICIES = ("linear", "step", "plateau", "cosine")

STEP_GAMMA = 0.1  # step: the rate is multiplied by this every lr_decay_iters epochs
PLATEAU_FACTOR = 0.2  # plateau: ReduceLROnPlateau(mode='min', factor=0.2, threshold=0.01, patience=5)
PLATEAU_THRESHOLD = 0.01  # relative: a metric counts as better below best * (1 - threshold)
PLATEAU_PATIENCE = 5  # bad epochs tolerated; the rate drops on the next one
PLATEAU_EPS = 1e-8  # torch's default: a drop smaller than this is skipped
COSINE_ETA_MIN = 0.0  # cosine: CosineAnnealingLR(T_max=n_epochs, eta_min=0)

# What the official training steps the plateau policy with: BaseModel.metric, which starts at 0 and
# which CUTModel never updates (docs/official-reference.md §17).
OFFICIAL_PLATEAU_METRIC = 0.0

SETTINGS = ("policy", "base_lr", "n_epochs", "n_epochs_decay", "lr_decay_iters")


def lr_factor(epoch: int, n_epochs: int, n_epochs_decay: int) -> float:
    """The official linear policy for 0-based ``epoch``: constant, then linear decay (never to 0)."""
    return 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1)


class LRSchedule:
    """The learning rate of each epoch under one official policy.

    ``epoch`` is the 0-based epoch the current ``lr`` is for; ``step`` ends that epoch (as the
    official ``update_learning_rate`` does) and moves to the next one.
    """

    def __init__(
        self, policy: str, base_lr: float, n_epochs: int, n_epochs_decay: int, lr_decay_iters: int = 50
    ) -> None:
        if policy not in LR_POLICIES:
            raise ValueError(f"lr_policy must be one of {', '.join(LR_POLICIES)}, got {policy!r}")
        if policy == "step" and lr_decay_iters < 1:
            raise ValueError(f"lr_decay_iters must be >= 1 for lr_policy step, got {lr_decay_iters}")
        if policy == "cosine" and n_epochs < 1:
            raise ValueError(f"n_epochs (cosine's T_max) must be >= 1 for lr_policy cosine, got {n_epochs}")
        self.policy = policy
        self.base_lr = float(base_lr)
        self.n_epochs = n_epochs
        self.n_epochs_decay = n_epochs_decay
        self.lr_decay_iters = lr_decay_iters
        self.epoch = 0
        self.lr = self._linear() if policy == "linear" else self.base_lr
        self.best = math.inf  # plateau: the lowest metric seen (mode 'min')
        self.num_bad_epochs = 0  # plateau: epochs since the metric last improved

    @property
    def factor(self) -> float:
        """The current rate as a fraction of the base rate."""
        return self.lr / self.base_lr

    def step(self, metric: float = OFFICIAL_PLATEAU_METRIC) -> float:
        """End the current epoch (``metric`` feeds plateau only); returns the next epoch's rate."""
        self.epoch += 1
        if self.policy == "linear":
            self.lr = self._linear()
        elif self.policy == "step":
            if self.epoch % self.lr_decay_iters == 0:
                self.lr = self.lr * STEP_GAMMA
        elif self.policy == "plateau":
            self._plateau(float(metric))
        else:
            self.lr = self._cosine_next()
        return self.lr

    def advance_to(self, epoch: int, metric: float = OFFICIAL_PLATEAU_METRIC) -> float:
        """Step until the rate is that of 0-based ``epoch``; returns it."""
        if epoch < self.epoch:
            raise ValueError(f"the schedule is at epoch {self.epoch} and cannot go back to epoch {epoch}")
        while self.epoch < epoch:
            self.step(metric)
        return self.lr

    def _linear(self) -> float:
        return self.base_lr * lr_factor(self.epoch, self.n_epochs, self.n_epochs_decay)

    def _plateau(self, metric: float) -> None:
        if metric < self.best * (1.0 - PLATEAU_THRESHOLD):
            self.best = metric
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs > PLATEAU_PATIENCE:
            reduced = max(self.lr * PLATEAU_FACTOR, 0.0)
            if self.lr - reduced > PLATEAU_EPS:
                self.lr = reduced
            self.num_bad_epochs = 0

    def _cosine_next(self) -> float:
        """torch's recursive (chainable) cosine step, which also restarts the rise after each trough."""
        period, e, low = self.n_epochs, self.epoch, COSINE_ETA_MIN
        if (e - 1 - period) % (2 * period) == 0:  # just past a trough: the recursion's ratio would be 0/0
            return self.lr + (self.base_lr - low) * (1 - math.cos(math.pi / period)) / 2
        ratio = (1 + math.cos(math.pi * e / period)) / (1 + math.cos(math.pi * (e - 1) / period))
        return ratio * (self.lr - low) + low

    def describe(self) -> str:
        """One line naming the policy and its parameters."""
        if self.policy == "linear":
            return f"linear ({self.n_epochs} epochs constant, then {self.n_epochs_decay} decaying)"
        if self.policy == "step":
            return f"step (x{STEP_GAMMA} every {self.lr_decay_iters} epochs)"
        if self.policy == "plateau":
            return f"plateau (x{PLATEAU_FACTOR} after {PLATEAU_PATIENCE + 1} epochs without improvement)"
        return f"cosine (down to {COSINE_ETA_MIN:g} over {self.n_epochs} epochs, then back up)"

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything the schedule is, as plain Python numbers and strings."""
        state = {name: getattr(self, name) for name in SETTINGS}
        state.update(epoch=self.epoch, lr=self.lr, best=self.best, num_bad_epochs=self.num_bad_epochs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; ValueError if it was saved by a schedule with other settings."""
        differ = [name for name in SETTINGS if state.get(name) != getattr(self, name)]
        if differ:
            saved = ", ".join(f"{name}={state.get(name)!r}" for name in differ)
            now = ", ".join(f"{name}={getattr(self, name)!r}" for name in differ)
            raise ValueError(f"the saved schedule has {saved}; this one has {now}")
        self.epoch = int(state["epoch"])
        self.lr = float(state["lr"])
        self.best = float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LRSchedule:
        """A schedule rebuilt from ``state_dict()`` alone."""
        schedule = cls(*(state[name] for name in SETTINGS))
        schedule.load_state_dict(state)
        return schedule
