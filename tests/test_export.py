"""jobs.export: ONNX (run by onnxruntime) and TorchScript (run by torch.jit) from every checkpoint kind,
at sizes other than the traced one, verified before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoint_kinds import trained  # noqa: F401 (a fixture: a tiny run trained from folders)

from cut import ResnetGenerator, UnetGenerator, generator_from_checkpoint, read_checkpoint
from cut.export import ExportedModel, ExportError, card_of, export_bytes, relative_error, verify
from cut.fast import accelerate
from cut.fast import plain as fast_plain
from cut.networks import init_weights
from jobs.export import check_shapes, main

KINDS = {
    "export": "run/export/generator.pt",
    "state": "run/checkpoints/step-000000004/state.pt",
    "run": "run",
    "official": "run/export/latest_net_G.pth",
}
NAMES = {"onnx": "generator.onnx", "torchscript": "generator.torchscript.pt"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_checkpoint_kind_exports_and_runs_in_its_runtime(trained, tmp_path, kind, fmt):  # noqa: F811
    out = tmp_path / "model"
    assert main(["--checkpoint", str(trained / KINDS[kind]), "--out", str(out), "--format", fmt]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["format"] == fmt and all(check["ok"] for check in report["checks"])
    traced = 32 if kind != "official" else 256  # an official state dict carries no model card
    assert report["checks"][0]["shape"] == [1, 3, traced, traced]
    data = (out / NAMES[fmt]).read_bytes()
    card = card_of(data, fmt)
    assert card == json.loads((out / "model_card.json").read_text())
    if kind != "official":
        assert card["crop_size"] == 32 and card["architecture"]["ngf"] == 8
    # a size and batch it was never traced or checked at, against the generator in PyTorch
    source = trained / KINDS[kind]
    netG = generator_from_checkpoint(read_checkpoint(resolved(source).read_bytes()))
    x = torch.rand(3, 3, 44, 20) * 2 - 1
    with torch.no_grad():
        assert relative_error(ExportedModel(data, fmt)(x), netG(x)) < 1e-4


def resolved(path):
    return path / "export" / "generator.pt" if path.is_dir() else path


def test_a_full_size_generator_exports_within_tolerance_at_other_sizes():
    torch.manual_seed(0)
    netG = accelerate(init_weights(ResnetGenerator(ngf=16, n_blocks=9))).eval()
    for fmt in ("onnx", "torchscript"):
        data = export_bytes(netG, fmt, (64, 64), {"preset": "CUT"})
        records = verify(netG, data, fmt, [(1, 128, 96), (2, 36, 52)])
        assert all(r["relative_error"] < 1e-5 for r in records), records


def test_a_unet_generator_exports_and_runs_alike_at_its_sizes():
    torch.manual_seed(0)
    netG = init_weights(UnetGenerator(num_downs=7, ngf=4, norm="batch", use_dropout=True), gain=0.5).eval()
    shapes = check_shapes(128, netG.size_multiple)
    assert shapes == [(1, 128, 128), (2, 128, 256)]  # multiples of 128, as unet_128 needs
    for fmt in ("onnx", "torchscript"):
        data = export_bytes(netG, fmt, (128, 128), {"preset": "CUT"})
        records = verify(netG, data, fmt, shapes)
        assert all(r["relative_error"] < 1e-5 for r in records), records


def test_an_export_that_computes_something_else_fails_and_writes_nothing(
        trained, tmp_path, monkeypatch, capfd):  # noqa: F811
    # record the eager fast path instead of the exporter-safe one: the ONNX exporter then drops the
    # blur's in-place additions, as a naive torch.onnx.export of this generator would
    monkeypatch.setattr(fast_plain, "exporting", lambda: False)
    out = tmp_path / "model"
    assert main(["--checkpoint", str(trained / KINDS["export"]), "--out", str(out), "--format", "onnx"]) == 1
    err = capfd.readouterr().err
    assert "the onnx export differs from the generator" in err and "nothing was written" in err
    assert not out.exists()


def test_relative_error_and_bad_inputs_are_clear():
    ref = torch.tensor([0.5, -1.0])
    assert relative_error(ref + 1e-5, ref) == pytest.approx(1e-5, rel=1e-2)
    assert relative_error(ref[:1], ref) == float("inf")
    with pytest.raises(ValueError, match="unknown export format"):
        export_bytes(ResnetGenerator(ngf=4, n_blocks=1), "tflite", (32, 32), {})
    with pytest.raises(ExportError):
        bad = ResnetGenerator(ngf=4, n_blocks=1).eval()
        data = export_bytes(bad, "torchscript", (32, 32), {})
        torch.nn.init.constant_(bad.model[1].weight, 0.5)  # the eager network no longer matches the export
        verify(bad, data, "torchscript", [(1, 32, 32)])


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    args = ["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"), "--format", "onnx"]
    assert main(args) == 1
    assert not (tmp_path / "o").exists()


def test_jobs_infer_runs_an_onnx_export_on_onnxruntime_like_torch(trained, tmp_path):  # noqa: F811
    from test_infer import image_folder, infer_here

    from pipeline.manifest import read_manifest

    model = tmp_path / "model"
    assert main(["--checkpoint", str(trained / KINDS["run"]), "--out", str(model), "--format", "onnx"]) == 0
    src = image_folder(tmp_path / "in", 3)
    outputs = {}
    for engine, checkpoint in (("torch", trained / KINDS["export"]), ("onnxruntime", model)):
        out = tmp_path / engine
        done = infer_here("--checkpoint", str(checkpoint), "--engine", engine, "--input", str(src),
                          "--out", str(out), "--workers", "0")
        assert done.returncode == 0, done.stderr
        rows = read_manifest(str(out)).to_pylist()
        assert {r["status"] for r in rows} == {"ok"} and len(rows) == 3
        outputs[engine] = {r["key"]: np.asarray(Image.open(r["output_url"])).astype(int) for r in rows}
    assert "engine onnxruntime" in done.stderr and "CPUExecutionProvider" in done.stderr
    for key, pixels in outputs["torch"].items():
        assert np.abs(pixels - outputs["onnxruntime"][key]).max() <= 1  # one level of rounding at most
    bad = infer_here("--checkpoint", str(model), "--engine", "onnxruntime", "--bf16", "--input", str(src),
                     "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--engine onnxruntime must be used without --bf16" in bad.stderr
    wrong = infer_here("--checkpoint", str(trained / KINDS["export"]), "--engine", "onnxruntime", "--input",
                       str(src), "--out", str(tmp_path / "y"), "--workers", "0")
    assert wrong.returncode == 2 and "not an ONNX model" in wrong.stderr and "Traceback" not in wrong.stderr
