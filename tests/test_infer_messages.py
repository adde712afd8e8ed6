"""What jobs.infer tells a first-time user (#27): the outputs' size and how to keep the inputs', the
tile size only when an input is tiled, what a listing counts, and refusals that leave nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_hostile_files import snapshot
from test_infer import image_folder, write_generator

from cut import ResnetGenerator, export_generator
from cut.checkpoint import to_bytes
from cut.networks import init_weights
from jobs.infer import main
from pipeline.manifest import read_manifest


def run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """jobs.infer in this process (the CPU defaults, no bar): its exit code and its log."""
    code = main(["--no-progress", *args])
    return code, capfd.readouterr().err


def info_lines(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if " INFO " in line and text in line]


def test_the_first_inference_says_the_output_size_and_how_to_keep_the_inputs(tmp_path, capfd):
    netG = init_weights(ResnetGenerator(ngf=4, n_blocks=1), gain=0.5)
    ckpt = tmp_path / "g.pt"
    ckpt.write_bytes(to_bytes(export_generator(netG, preset="CUT", card={"crop_size": 32})))
    src = image_folder(tmp_path / "in", 2, size=(48, 48))
    code, log = run(capfd, "--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "small"))
    assert code == 0
    (rule,) = info_lines(log, "every output is 32x32")
    assert "the crop size the model was trained at" in rule
    assert "--preprocess none keeps each input's size" in rule
    (smaller,) = info_lines(log, "outputs are smaller than their inputs")
    assert smaller.split("INFO jobs.infer: ")[1].startswith("2 outputs") and "--preprocess none" in smaller
    rows = read_manifest(str(tmp_path / "small")).to_pylist()
    assert {(r["out_width"], r["out_height"]) for r in rows} == {(32, 32)}

    # The README's example with --preprocess none: outputs of the inputs' size, said so, nothing smaller.
    code, log = run(capfd, "--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "same"),
                    "--preprocess", "none")
    assert code == 0
    assert len(info_lines(log, "each output has its input's size (--preprocess none)")) == 1
    assert not info_lines(log, "smaller than their inputs")
    rows = read_manifest(str(tmp_path / "same")).to_pylist()
    assert {(r["out_width"], r["out_height"]) for r in rows} == {(48, 48)}


def test_a_crop_size_given_or_defaulted_is_named_as_such(tmp_path, capfd):
    ckpt = write_generator(tmp_path / "g.pt")  # a card without a crop size
    src = image_folder(tmp_path / "in", 1, size=(40, 40))
    code, log = run(capfd, "--checkpoint", ckpt, "--input", str(src), "--out", str(tmp_path / "a"),
                    "--crop-size", "32")
    assert code == 0 and len(info_lines(log, "every output is 32x32 (--preprocess official, as the official "
                                             "test.py; --crop-size)")) == 1
    code, log = run(capfd, "--checkpoint", ckpt, "--input", str(src), "--out", str(tmp_path / "b"),
                    "--preprocess", "shortside", "--load-size", "24")
    assert code == 0 and len(info_lines(log, "each output's shorter side is 24")) == 1
    assert len(info_lines(log, "1 outputs are smaller than their inputs (--preprocess shortside)")) == 1


def test_the_tile_size_is_said_only_when_an_input_is_tiled_with_the_count(tmp_path, capfd):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 2, size=(40, 40))
    Image.new("RGB", (20, 20)).save(src / "small.png")
    common = ["--checkpoint", ckpt, "--input", str(src), "--preprocess", "none"]
    code, log = run(capfd, *common, "--out", str(tmp_path / "whole"))
    assert code == 0 and "tile by tile" not in log and "translated whole" not in log
    code, log = run(capfd, *common, "--out", str(tmp_path / "tiled"), "--tile-size", "32")
    assert code == 0
    (tiled,) = [line for line in log.splitlines() if "tile by tile" in line]
    assert tiled.endswith("inputs larger than 32 network pixels on a side are translated tile by tile "
                          "(exactly; --tile-size): 2 in this run")


def test_the_planning_lines_say_what_they_count(tmp_path, capfd):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 3, size=(40, 40))
    code, log = run(capfd, "--checkpoint", ckpt, "--input", str(src), "--out", str(tmp_path / "o"),
                    "--crop-size", "32", "--unit-size", "2")
    assert code == 0
    assert len(info_lines(log, "worker 0 plans the job: listing 1 input location(s)")) == 1
    assert len(info_lines(log, "planned 3 images in 2 units")) == 1


@pytest.mark.parametrize("out", ["new", "a/b/c", "exists"])
@pytest.mark.parametrize(
    "input_kind", ["empty folder", "no image names", "empty listing", "glob matching nothing", "missing"])
def test_a_wrong_input_leaves_nothing_behind(tmp_path, capfd, out, input_kind):
    """Refused after the plan lock was written too: the lock, OUT/_plan/, --out and the folders above it
    that the run made are gone again."""
    ckpt = write_generator(tmp_path / "g.pt")
    (tmp_path / "exists").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("not an image")
    (tmp_path / "list.txt").write_text("")
    inputs = {"empty folder": tmp_path / "empty", "no image names": tmp_path / "texts",
              "empty listing": tmp_path / "list.txt", "glob matching nothing": f"{tmp_path}/empty/*.png",
              "missing": tmp_path / "nowhere"}
    before = snapshot(tmp_path)
    code, log = run(capfd, "--checkpoint", ckpt, "--input", str(inputs[input_kind]), "--out",
                    str(tmp_path / out), "--crop-size", "32")
    assert code == 2, log
    assert snapshot(tmp_path) == before
    assert not Path(tmp_path / out / "_plan").exists()
