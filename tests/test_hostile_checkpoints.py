"""Hostile checkpoints (issue 25): what a checkpoint or its model card declares is compared with the
tensors it holds, and with sane bounds, before anything of the declared size is built; weights that
are not finite floating tensors are refused. Every job that loads weights (jobs.infer, jobs.export,
jobs.eval --checkpoint, jobs.train model.init_from) exits 2 with one line that names the file and the
fault, and writes nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inprocess import run_main
from test_infer import image_folder
from test_train import data, train_here  # noqa: F401 (data: a fixture, two tiny shard sets)

from cut import ResnetGenerator
from cut.checkpoint import export_generator, to_bytes
from cut.export import to_onnx
from jobs.eval import main as eval_main
from jobs.export import main as export_main
from jobs.infer import main as infer_main
from pipeline.checkpoints import Checkpointer

ROOT = Path(__file__).resolve().parent.parent
CARD = {"preset": "CUT", "crop_size": 32, "load_size": 36}


def tiny() -> ResnetGenerator:
    torch.manual_seed(0)
    return ResnetGenerator(ngf=4, n_blocks=1).eval()


def export(state: dict | None = None, architecture: dict | None = None, metadata: dict | None = None) -> dict:
    """A generator export of the tiny network, with any of its parts replaced."""
    obj = export_generator(tiny(), card=CARD)
    if state is not None:
        obj["state_dict"] = state
    if architecture is not None:
        obj["architecture"] = architecture
    if metadata is not None:
        obj["metadata"] = metadata
    return obj


def weights(**replaced: object) -> dict:
    """The tiny network's state dict with some tensors replaced."""
    return {**tiny().state_dict(), **replaced}


NAN = torch.full((4, 3, 7, 7), float("nan"))
VIEW = torch.zeros(1).expand(4, 3, 7, 7)  # 4 bytes of data that say 588 values
ARCH = tiny().architecture

# name: (file name, checkpoint, what the error must say)
HOSTILE = {
    "declared-ngf-vs-tensors": (
        "generator.pt", lambda: export(architecture={**ARCH, "ngf": 512, "n_blocks": 9}),
        r"declared architecture \(.*ngf=512, n_blocks=9.*\) does not match the tensors.*"
        r"model\.1\.weight \(4, 3, 7, 7\) != \(512, 3, 7, 7\)"),
    "ngf-4000-and-no-tensors": (
        "generator.pt", lambda: export(state={}, architecture={"ngf": 4000, "n_blocks": 9}),
        r"declared architecture has ngf=4000; expected an integer in 1\.\.1024"),
    "card-crop-size-60000": (
        "generator.pt", lambda: export(metadata={"card": {**CARD, "crop_size": 60000}}),
        r"the model card declares crop_size=60000; expected an integer in 8\.\.4096"),
    "card-not-a-dict": (
        "generator.pt", lambda: export(metadata={"card": ["crop_size", 32]}),
        r"the model card is a list, not a dict"),
    "card-architecture-vs-tensors": (
        "generator.pt", lambda: export(metadata={"card": {**CARD, "architecture": {**ARCH, "ngf": 16}}}),
        r"the model card's architecture \(.*ngf=16.*\) does not match the tensors.*"
        r"model\.1\.weight \(4, 3, 7, 7\) != \(16, 3, 7, 7\)"),
    "nan-weights": (
        "generator.pt", lambda: export(state=weights(**{"model.1.weight": NAN})),
        r"1 of \d+ tensors hold NaN or Inf \(e\.g\. \['model\.1\.weight'\]\)"),
    "inf-official": (
        "latest_net_G.pth", lambda: weights(**{"model.1.weight": torch.full((4, 3, 7, 7), float("inf"))}),
        r"tensors hold NaN or Inf"),
    "nan-training-state": (
        "state.pt", lambda: {"model": {"G": weights(**{"model.1.weight": NAN}), "opt_G": {}}, "card": CARD},
        r"tensors hold NaN or Inf"),
    "broadcast-view": (
        "generator.pt", lambda: export(state=weights(**{"model.1.weight": VIEW})),
        r"model\.1\.weight declares shape \(4, 3, 7, 7\) but holds 4 bytes of data"),
    "integer-weights": (
        "generator.pt", lambda: export(state=weights(**{"model.1.weight": torch.zeros(4, 3, 7, 7).int()})),
        r"dtype mismatch: \['model\.1\.weight torch\.int32 != torch\.float32'\]"),
    "non-tensor-in-state-dict": (
        "generator.pt", lambda: export(state=weights(**{"model.1.weight": [0.5] * 4})),
        r"a state dict holds tensors by name, but 'model\.1\.weight' is a list"),
}


def hostile(tmp_path: Path, case: str) -> tuple[Path, str]:
    name, build, message = HOSTILE[case]
    path = tmp_path / "bad" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(build()))
    return path, message


def hostile_run(tmp_path: Path) -> Path:
    """A run folder whose newest complete checkpoint holds NaN weights."""
    folder = tmp_path / "run"
    state = {"model": {"G": weights(**{"model.1.weight": NAN}), "opt_G": {}}, "card": CARD}
    Checkpointer(str(folder / "checkpoints")).commit(3, {"state.pt": to_bytes(state)})
    return folder


def job(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_refused(done: subprocess.CompletedProcess | str, checkpoint: Path, message: str) -> None:
    """Exit 2 (checked by the caller for in-process jobs), one error naming the file and the fault."""
    err = done if isinstance(done, str) else done.stderr
    if not isinstance(done, str):
        assert done.returncode == 2, err
    assert str(checkpoint) in err and re.search(message, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(HOSTILE))
def test_jobs_infer_refuses_a_hostile_checkpoint_with_exit_2_and_writes_nothing(tmp_path, case):
    checkpoint, message = hostile(tmp_path, case)
    src = image_folder(tmp_path / "in", 1)
    out = tmp_path / "out"  # in-process: the exit code of a real process is held by the run-folder case
    done = run_main(infer_main, "--no-progress", "--workers", "0", "--checkpoint", str(checkpoint),
                    "--input", str(src), "--out", str(out))
    assert_refused(done, checkpoint, message)
    assert not out.exists()  # no plan, no manifest rows, no _SUCCESS


def test_jobs_infer_refuses_a_run_folder_whose_newest_checkpoint_holds_nan(tmp_path):
    folder = hostile_run(tmp_path)
    out = tmp_path / "out"
    done = job("jobs.infer", "--no-progress", "--workers", "0", "--checkpoint", str(folder),
               "--input", str(image_folder(tmp_path / "in", 1)), "--out", str(out))
    assert_refused(done, folder / "checkpoints" / "step-000000003" / "state.pt", "tensors hold NaN or Inf")
    assert not out.exists()


def onnx_model(tmp_path: Path, card: dict, nan: bool = False) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(to_onnx(tiny(), (32, 32), card))
    if nan:
        first = model.graph.initializer[0]
        array = numpy_helper.to_array(first).copy()
        array.flat[0] = float("nan")
        first.CopyFrom(numpy_helper.from_array(array, first.name))
    path = tmp_path / "model" / "generator.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("fault", ["nan-initializer", "card-crop-size-60000"])
def test_jobs_infer_on_onnxruntime_refuses_nan_weights_and_an_insane_card(tmp_path, fault):
    card = {**CARD, "crop_size": 60000} if fault == "card-crop-size-60000" else CARD
    model = onnx_model(tmp_path, card, nan=fault == "nan-initializer")
    message = "weights hold NaN or Inf" if fault == "nan-initializer" else "declares crop_size=60000"
    out = tmp_path / "out"
    done = run_main(infer_main, "--no-progress", "--workers", "0", "--engine", "onnxruntime", "--checkpoint",
                    str(model), "--input", str(image_folder(tmp_path / "in", 1)), "--out", str(out))
    assert_refused(done, model, message)
    assert not out.exists()


@pytest.mark.parametrize("case", ["declared-ngf-vs-tensors", "ngf-4000-and-no-tensors",
                                  "card-crop-size-60000", "nan-weights", "broadcast-view",
                                  "non-tensor-in-state-dict"])
def test_jobs_export_refuses_a_hostile_checkpoint_with_exit_2_and_writes_nothing(tmp_path, capfd, case):
    checkpoint, message = hostile(tmp_path, case)
    out = tmp_path / "model"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--format", "onnx"]) == 2
    assert_refused(capfd.readouterr().err, checkpoint, message)
    assert not out.exists()


@pytest.mark.parametrize("case", ["declared-ngf-vs-tensors", "nan-weights"])
def test_jobs_eval_refuses_a_hostile_checkpoint_with_exit_2_and_writes_nothing(tmp_path, case):
    checkpoint, message = hostile(tmp_path, case)
    out = tmp_path / "eval"
    done = run_main(eval_main, "--checkpoint", str(checkpoint), "--test-a",
                    str(image_folder(tmp_path / "A", 2)), "--test-b", str(image_folder(tmp_path / "B", 2)),
                    "--out", str(out), "--crop-size", "32", "--no-download")
    assert_refused(done, checkpoint, message)
    assert not out.exists()


@pytest.mark.parametrize("case", ["declared-ngf-vs-tensors", "nan-weights"])
def test_jobs_train_refuses_a_hostile_init_from_with_exit_2_before_training(tmp_path, data, case):  # noqa: F811
    checkpoint, message = hostile(tmp_path, case)
    run_dir = tmp_path / "run"
    done = train_here(*data, str(run_dir), f"model.init_from={checkpoint}")
    assert_refused(done, checkpoint, message)
    assert "model.init_from" in done.stderr
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists() else []
    assert not run_dir.exists(), left  # a refusal writes nothing
