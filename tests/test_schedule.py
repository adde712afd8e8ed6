"""train.lr_policy: the official policies (docs/official-reference.md §17), resumed exactly."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from test_train import assert_states_equal, final_state, shard_set
from torch.optim import lr_scheduler

from cut.checkpoint import read_checkpoint, to_bytes
from cut.schedule import LR_POLICIES, LRSchedule
from jobs.config import ConfigError, TrainConfig, load_config, resolve_train_config
from jobs.runtime import Runtime
from jobs.train import Trainer

BASE_LR = 2e-4
REQUIRED = ["data.a=/a", "data.b=/b", "run.url=/run"]
# (n_epochs, n_epochs_decay, lr_decay_iters): short schedules, one with a period of 1, and CUT's own.
SHAPES = [(3, 4, 2), (1, 5, 1), (7, 9, 3), (200, 200, 50)]


def torch_rates(policy: str, n_epochs: int, n_epochs_decay: int, lr_decay_iters: int) -> list[float]:
    """The lr of every epoch from torch's scheduler built as the official get_scheduler builds it,
    stepped once at the end of every epoch as update_learning_rate does (plateau with metric 0)."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    if policy == "linear":
        scheduler = lr_scheduler.LambdaLR(
            optimizer, lambda e: 1.0 - max(0, e + 1 - n_epochs) / float(n_epochs_decay + 1)
        )
    elif policy == "step":
        scheduler = lr_scheduler.StepLR(optimizer, step_size=lr_decay_iters, gamma=0.1)
    elif policy == "plateau":
        scheduler = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.2, threshold=0.01, patience=5
        )
    else:
        scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_epochs, eta_min=0)
    rates = []
    for _ in range(n_epochs + n_epochs_decay):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if policy == "plateau":
            scheduler.step(0)
        else:
            scheduler.step()
    return rates


def our_rates(schedule: LRSchedule, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        rates.append(schedule.lr)
        schedule.step()
    return rates


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy", LR_POLICIES)
def test_every_epoch_has_the_rate_torch_gives_when_configured_the_official_way(policy, shape):
    expected = torch_rates(policy, *shape)
    got = our_rates(LRSchedule(policy, BASE_LR, *shape), shape[0] + shape[1])
    assert got == expected  # bit for bit, every epoch


def test_the_shapes_of_the_policies():
    """What the formulas mean, independently of torch: read off the factors of short schedules."""
    step = LRSchedule("step", 1.0, 3, 4, lr_decay_iters=2)
    assert our_rates(step, 7) == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 0.001])
    plateau = our_rates(LRSchedule("plateau", 1.0, 10, 10), 20)
    # The metric never improves after the first epoch: a 5x drop after each 6 bad epochs.
    assert plateau == pytest.approx([1.0] * 7 + [0.2] * 6 + [0.04] * 6 + [0.008])
    cosine = our_rates(LRSchedule("cosine", 1.0, 4, 4), 8)
    assert cosine == pytest.approx([1, 0.8535534, 0.5, 0.1464466, 0, 0.1464466, 0.5, 0.8535534])
    linear = our_rates(LRSchedule("linear", 1.0, 2, 3), 5)
    assert linear == pytest.approx([1, 1, 0.75, 0.5, 0.25])


def test_plateau_stops_reducing_once_a_drop_is_below_torchs_eps():
    schedule = LRSchedule("plateau", BASE_LR, 200, 200)
    rates = our_rates(schedule, 400)
    assert min(rates) == rates[-1] > 0
    assert len(set(rates)) == 8  # 2e-4 and seven 5x drops; the eighth would be smaller than 1e-8


@pytest.mark.parametrize("policy", LR_POLICIES)
def test_a_schedule_restored_mid_way_from_its_state_continues_bit_for_bit(policy):
    shape = (7, 9, 3)
    reference = our_rates(LRSchedule(policy, BASE_LR, *shape), 16)
    first = LRSchedule(policy, BASE_LR, *shape)
    head = our_rates(first, 9)  # mid-way: plateau has dropped once and counts bad epochs again
    state = first.state_dict()
    assert all(isinstance(v, (str, int, float)) for v in state.values())  # plain data
    json.dumps(state)
    saved = read_checkpoint(to_bytes(state))  # as a checkpoint stores and reads it
    loaded = LRSchedule(policy, BASE_LR, *shape)
    loaded.load_state_dict(saved)
    assert head + our_rates(loaded, 7) == reference
    assert head + our_rates(LRSchedule.from_state(saved), 7) == reference


def test_a_state_from_other_settings_is_refused_naming_them():
    state = LRSchedule("step", BASE_LR, 3, 4, lr_decay_iters=2).state_dict()
    with pytest.raises(ValueError, match=r"lr_decay_iters=2.*lr_decay_iters=3"):
        LRSchedule("step", BASE_LR, 3, 4, lr_decay_iters=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"policy='step'.*policy='cosine'"):
        LRSchedule("cosine", BASE_LR, 3, 4).load_state_dict(state)
    schedule = LRSchedule("linear", BASE_LR, 3, 4)
    schedule.advance_to(2)
    with pytest.raises(ValueError, match="cannot go back"):
        schedule.advance_to(1)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["train.lr_policy=exponential"], "train.lr_policy"),
        (["train.lr_policy=Step"], "train.lr_policy"),
        (["train.lr_policy=step", "train.lr_decay_iters=0"], "train.lr_decay_iters"),
        (["train.lr_policy=cosine", "train.n_epochs=0", "train.n_epochs_decay=5"], "train.n_epochs"),
        (["train.lr_decay_iters=2.5"], "train.lr_decay_iters"),
    ],
)
def test_config_rejects_bad_policies_and_values_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'".replace(".", r"\.")):
        resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", REQUIRED + overrides))


def test_config_defaults_are_the_official_ones_and_each_policy_is_accepted():
    c = resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", REQUIRED))
    assert (c.train.lr_policy, c.train.lr_decay_iters) == ("linear", 50)
    for policy in LR_POLICIES:
        overrides = [*REQUIRED, f"train.lr_policy={policy}"]
        c = resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", overrides))
        assert c.train.lr_policy == policy
    # lr_decay_iters matters to step alone, as in the official code.
    resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [*REQUIRED, "train.lr_decay_iters=0"]))


# ------------------------------------------------------------------------------- a real training run
def step_run_config(a: str, b: str, run_url: str) -> TrainConfig:
    """3 epochs of 4 steps under lr_policy step, 10x down after every epoch."""
    overrides = [
        f"data.a={a}",
        f"data.b={b}",
        f"run.url={run_url}",
        "train.lr_policy=step",
        "train.lr_decay_iters=1",
        "train.n_epochs=2",
        "train.n_epochs_decay=1",
        "train.max_steps=null",
        "train.checkpoint_every=100",
        "train.log_every=4",
    ]
    return resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", overrides))


Rates = list[tuple[float, ...]]  # the lr of G, D and F at each step


def train_recording(config: TrainConfig, rates: Rates, stop_after: int | None = None) -> None:
    """Run jobs.train's Trainer as `main` does, noting the lr of G, D and F at every step; a SIGTERM
    goes to the run's own handler once the step numbered `stop_after` has run."""
    torch.manual_seed(config.train.seed)
    trainer = Trainer(config, Runtime(0, 1, 0, torch.device("cpu")))
    train_step = trainer.model.train_step

    def step_noting_the_rates(*args, **kwargs):
        rates.append(tuple(opt.param_groups[0]["lr"] for opt in trainer.model.optimizers))
        losses = train_step(*args, **kwargs)
        if trainer.step + 1 == stop_after:
            trainer.signals.handle(signal.SIGTERM, None)
        return losses

    trainer.model.train_step = step_noting_the_rates
    assert trainer.run() == 0


@pytest.mark.slow
def test_a_step_policy_run_stopped_and_resumed_twice_keeps_the_uninterrupted_rates(tmp_path: Path):
    a = shard_set(tmp_path, str(tmp_path / "A"), "A", 4, 0)
    b = shard_set(tmp_path, str(tmp_path / "B"), "B", 3, 1)
    reference: Rates = []
    train_recording(step_run_config(a, b, str(tmp_path / "ref")), reference)
    assert reference == [(2e-4,) * 3] * 4 + [(2e-4 * 0.1,) * 3] * 4 + [(2e-4 * 0.1 * 0.1,) * 3] * 4

    resumed: Rates = []
    config = step_run_config(a, b, str(tmp_path / "stopped"))
    train_recording(config, resumed, stop_after=4)  # at the end of epoch 0, before its step
    assert final_state(config.run.url)["schedule"]["epoch"] == 0
    train_recording(config, resumed, stop_after=7)  # mid-way through epoch 1
    assert final_state(config.run.url)["schedule"]["epoch"] == 1
    train_recording(config, resumed)
    assert resumed == reference
    assert_states_equal(final_state(str(tmp_path / "ref")), final_state(config.run.url))
