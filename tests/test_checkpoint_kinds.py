"""Every generator we produce or read works in jobs.infer and jobs.eval: exports, official
latest_net_G.pth, training state.pt files and run folders; the model card carries the trained size."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import image_bytes
from inprocess import run_main
from test_train import run, train_cmd

from cut import model_card, read_checkpoint
from jobs.eval import main as eval_main
from jobs.infer import main as infer_main
from pipeline.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny run (configs/tiny.yaml: 32-pixel crops) trained from plain folders; read-only, trained
    once for every module that uses it (test_export too)."""
    root = tmp_path_factory.mktemp("trained")
    for name, seed in (("A", 0), ("B", 40)):
        folder = root / name
        folder.mkdir()
        for i in range(6):
            (folder / f"{name}-{i}.png").write_bytes(image_bytes(seed + i, (40, 44), fmt="PNG"))
    done = run(train_cmd(str(root / "A"), str(root / "B"), str(root / "run"), "train.max_steps=4"))
    assert done.returncode == 0, done.stderr
    return root


def infer(*args: str) -> subprocess.CompletedProcess:
    """jobs.infer's main in this process (tests/inprocess.py): what it writes and says, not its process."""
    return run_main(infer_main, "--no-progress", "--workers", "0", *args)


@pytest.mark.slow
def test_a_model_card_rides_in_every_checkpoint_and_export(trained):
    state = read_checkpoint((trained / "run" / "checkpoints" / "step-000000004" / "state.pt").read_bytes())
    export = read_checkpoint((trained / "run" / "export" / "generator.pt").read_bytes())
    for card in (model_card(state), model_card(export)):
        assert card["preset"] == "CUT" and card["crop_size"] == 32 and card["load_size"] == 36
        assert card["architecture"]["ngf"] == 8 and card["step"] == 4
        assert card["data"]["a_images"] == 6 and card["data"]["a"].endswith("A")
        assert card["code_version"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["export", "state", "run", "official"])
def test_jobs_infer_takes_every_checkpoint_kind_at_the_trained_size(trained, tmp_path, kind):
    checkpoint = {
        "export": trained / "run" / "export" / "generator.pt",
        "state": trained / "run" / "checkpoints" / "step-000000004" / "state.pt",
        "run": trained / "run",
        "official": trained / "run" / "export" / "latest_net_G.pth",
    }[kind]
    wide = tmp_path / "in"
    wide.mkdir()
    (wide / "wide.png").write_bytes(image_bytes(1, (64, 40), fmt="PNG"))
    done = infer("--checkpoint", str(checkpoint), "--input", str(wide), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    (row,) = read_manifest(str(tmp_path / "out")).to_pylist()
    size = 32 if kind != "official" else 256  # an official state dict carries no card
    assert row["status"] == "ok" and (row["out_width"], row["out_height"]) == (size, size)
    assert "were not square and were squashed" in done.stderr


@pytest.mark.slow
def test_jobs_eval_takes_a_run_folder(trained, tmp_path):
    real_b = tmp_path / "testB"  # real B the classifier did not train on (jobs.eval refuses those, #27)
    real_b.mkdir()
    for i in range(3):
        (real_b / f"B-{i}.png").write_bytes(image_bytes(80 + i, (40, 44), fmt="PNG"))
    done = run_main(
        eval_main,
        "--checkpoint",
        str(trained / "run"),
        "--test-a",
        str(trained / "A"),
        "--test-b",
        str(real_b),
        "--out",
        str(tmp_path / "eval"),
        "--crop-size",
        "32",
        "--metrics",
        "domain",
        "--train-a",
        str(trained / "A"),
        "--train-b",
        str(trained / "B"),
        "--domain-classifier",
        str(tmp_path / "domain.pt"),
        "--classifier-epochs",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "eval" / "metrics.json").exists()


def test_a_folder_without_checkpoints_is_a_clear_error(tmp_path):
    done = infer("--checkpoint", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and "no complete checkpoint" in done.stderr and "Traceback" not in done.stderr
