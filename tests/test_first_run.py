"""What a newcomer's first training run tells them: its cost before it runs long, a CPU-sized config to
look at first, loader workers that fit the machine, refusals that name the key, and the datasets the
real-data tests need."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from jobs import runtime
from jobs.config import TrainConfig, cut_config, load_config, resolve_train_config, to_yaml
from jobs.run_claim import CONFIG, RunClaimError, config_changes_on_resume, with_loader_workers
from jobs.train_log import FIRST_LOOK_CONFIG, cost_line

ROOT = Path(__file__).resolve().parent.parent
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def tiny(run: Path, *overrides: str) -> TrainConfig:
    return resolve_train_config(load_config(TrainConfig, str(ROOT / "configs" / "tiny.yaml"),
                                            ["data.a=/a", "data.b=/b", f"run.url={run}", *overrides]))


def test_a_long_cpu_run_says_what_it_costs_and_how_to_get_a_first_look_in_minutes():
    level, line = cost_line(4, 12_000, 2.1, CPU)
    assert level == logging.WARNING
    assert line.startswith("step 4: 2.10 s/step on cpu, 11996 steps to go: about 7.0 h.")
    assert f"--config {FIRST_LOOK_CONFIG}" in line
    suggested = int(re.search(r"train\.max_steps=(\d+)", line).group(1))
    assert 4 + 400 <= suggested <= 4 + 15 * 60 / 2.1  # about a quarter of an hour from here


def test_a_short_or_gpu_run_states_its_cost_without_advice():
    level, line = cost_line(4, 600, 0.3, CPU)
    assert (level, line) == (logging.INFO, "step 4: 0.30 s/step on cpu, 596 steps to go: about 3 min")
    level, line = cost_line(4, 400_000, 0.2, CUDA)
    assert level == logging.INFO and line.endswith("about 22.2 h") and "first look" not in line
    assert cost_line(4, 8, 0.5, CPU) is None  # a run about to end is not told its cost


def test_the_first_look_config_is_fastcut_at_a_cpus_size():
    config = resolve_train_config(load_config(TrainConfig, str(ROOT / FIRST_LOOK_CONFIG),
                                              ["data.a=/a", "data.b=/b", "run.url=/run"]))
    model = cut_config(config, "cpu")
    assert config.model.preset == "FastCUT" and model.flip_equivariance and not model.nce_idt
    assert config.data.crop_size == 128 and config.train.max_steps == 600
    assert config.data.workers is None  # the machine's default
    assert (model.ngf, model.n_blocks) == (32, 6)


def test_loader_workers_default_to_none_on_cpu_and_to_what_the_cores_allow_on_a_gpu(tmp_path, monkeypatch):
    for shipped in ("cut.yaml", "fastcut.yaml", "fastcut-cpu.yaml"):
        assert yaml.safe_load((ROOT / "configs" / shipped).read_text())["data"]["workers"] is None, shipped
    assert with_loader_workers(tiny(tmp_path / "run", "data.workers=null"), CPU).data.workers == 0
    assert with_loader_workers(tiny(tmp_path / "run", "data.workers=3"), CPU).data.workers == 3  # as given
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, workers in ((2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(runtime, "available_cores", lambda cores=cores: cores)
        assert runtime.default_loader_workers(CUDA) == workers, cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks share the 16 cores
    assert runtime.default_loader_workers(CUDA) == 1


def test_a_resumed_run_keeps_its_loader_workers_for_an_exact_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_text(to_yaml(tiny(run, "data.workers=4")))  # started on a bigger machine
    assert with_loader_workers(tiny(run, "data.workers=null"), CPU).data.workers == 4
    assert with_loader_workers(tiny(run, "data.workers=1"), CPU).data.workers == 1  # given: as given


def test_a_changed_network_width_is_refused_naming_the_key_both_values_and_the_stored_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_text(to_yaml(tiny(run)))
    for allow in ("false", "true"):  # no config change can load tensors of another shape
        with pytest.raises(RunClaimError) as refused:
            config_changes_on_resume(tiny(run, "model.ngf=16", f"run.allow_config_change={allow}"))
        message = str(refused.value)
        assert f"model.ngf 8 (in {run / CONFIG}) -> 16" in message
        assert "Resume with model.ngf=8, or train a new run.url" in message
        assert "allow_config_change" not in message
    _, changes = config_changes_on_resume(tiny(run, "model.lambda_NCE=2", "run.allow_config_change=true"))
    assert changes[0] == ("model.lambda_NCE", None, 2.0)  # other keys: as before


def test_a_test_that_needs_a_dataset_says_which_and_how_to_provide_it(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CUT_DATASETS", str(tmp_path))
    with pytest.raises(pytest.skip.Exception) as skipped:
        dataset("horse2zebra")
    assert str(skipped.value).startswith(
        "needs the horse2zebra dataset: set CUT_DATASETS to a folder holding horse2zebra/trainA/ and "
        "horse2zebra/trainB/")
    for domain in ("trainA", "trainB"):
        (tmp_path / "horse2zebra" / domain).mkdir(parents=True)
    assert dataset("horse2zebra") == tmp_path / "horse2zebra"
