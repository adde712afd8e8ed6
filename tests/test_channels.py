"""Channels and bit depth end to end: grey, grey + alpha, RGBA and 16-bit sources through shards,
training and jobs.infer, outputs written in the matching mode, a source alpha kept."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from inprocess import run_main
from PIL import Image

from cut import ResnetGenerator, export_generator, generator_from_checkpoint, read_checkpoint
from cut.checkpoint import to_bytes
from cut.inference import from_pixels, to_uint8, to_uint16
from cut.networks import init_weights
from jobs.config import ConfigError, TrainConfig, load_config, resolve_train_config
from jobs.infer import main as infer_main
from pipeline.ingest import build_shards
from pipeline.pixels import decode_pixels
from pipeline.png import encode_png
from pipeline.transforms import inference_pixels
from pipeline.translation_io import encode_image

ROOT = Path(__file__).resolve().parent.parent
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def pixels(seed: int, size: tuple[int, int], channels: int, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    array = rng.integers(0, top + 1, (size[1], size[0], channels)).astype(dtype)
    return array


def folder_of(root: Path, n: int, channels: int, size=(40, 36), dtype=np.uint8) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"im-{i:02d}.png").write_bytes(encode_png(pixels(i, size, channels, dtype)))
    return root


def generator_file(path: Path, input_nc: int = 3, output_nc: int = 3) -> str:
    torch.manual_seed(0)
    netG = init_weights(ResnetGenerator(input_nc, output_nc, ngf=4, n_blocks=1), gain=0.5)
    path.write_bytes(to_bytes(export_generator(netG, preset="CUT")))
    return str(path)


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def infer(ckpt: str, src: Path, out: Path, *extra: str) -> list[dict]:
    """jobs.infer's main in this process (tests/inprocess.py); the manifest's rows."""
    done = run_main(infer_main, "--no-progress", "--checkpoint", ckpt, "--input", str(src), "--out", str(out),
                    "--crop-size", "32", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return pq.read_table(out / "manifest").to_pylist()


def sharded_domains(tmp_path: Path, ext: str, encode: Callable[[int], bytes]) -> dict[str, str]:
    """Domains A and B of four files each (``encode(seed)``), sharded two a shard: name -> shard set."""
    domains = {}
    for name, seed in (("A", 0), ("B", 5)):
        folder = tmp_path / f"src-{name}"
        folder.mkdir()
        for i in range(4):
            (folder / f"{name}{i}.{ext}").write_bytes(encode(seed + i))
        domains[name] = str(tmp_path / name)
        build_shards([str(folder)], domains[name], prefix=name, domain=name, max_count=2, workers=1,
                     progress=False)
    return domains


def opened(url: str) -> Image.Image:
    return Image.open(url)


# ------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("source", [1, 2, 3, 4])
def test_every_source_mode_converts_to_the_models_channels(source, channels):
    array = pixels(source, (9, 7), source)
    decoded = decode_pixels(encode_png(array), channels)
    assert decoded.array.shape == (7, 9, channels) and decoded.array.dtype == np.uint8
    colour = array[:, :, : 3 if source >= 3 else 1]
    if channels >= 3 and source < 3:
        assert np.array_equal(decoded.array[:, :, :3], np.repeat(colour, 3, axis=2))
    if channels < 3 and source >= 3:  # Pillow's (and torchvision's Grayscale) luma, exactly
        grey = np.asarray(Image.fromarray(np.ascontiguousarray(colour)).convert("L"))
        assert np.array_equal(decoded.array[:, :, 0], grey)
    if source in (2, 4):
        alpha = array[:, :, -1]
        kept = decoded.array[:, :, -1] if channels in (2, 4) else decoded.alpha
        assert np.array_equal(kept, alpha)
    elif channels in (2, 4):
        assert (decoded.array[:, :, -1] == 255).all()  # no alpha in the source: opaque
    else:
        assert decoded.alpha is None


def test_a_palette_image_with_transparency_keeps_its_alpha():
    img = Image.new("P", (6, 4))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    buffer = io.BytesIO()
    img.save(buffer, "PNG", transparency=0)
    decoded = decode_pixels(buffer.getvalue(), 3)
    assert decoded.array[1, 1].tolist() == [255, 0, 0]
    assert decoded.alpha[1, 1] == 255 and decoded.alpha[0, 0] == 0


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_sixteen_bit_sources_stay_sixteen_bit_and_scale_to_the_network_range(channels):
    array = pixels(7, (12, 8), channels, np.uint16)
    array[0, 0] = 0
    array[0, 1] = 65535
    decoded = decode_pixels(encode_png(array), channels)
    assert decoded.array.dtype == np.uint16 and np.array_equal(decoded.array, array)
    x = from_pixels(inference_pixels(decoded.array, "none", 0, 0).unsqueeze(0))
    assert x[0, :, 0, 0].tolist() == [-1.0] * channels and x[0, :, 0, 1].tolist() == [1.0] * channels
    assert torch.equal(to_uint16(x), torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0))


def test_a_sixteen_bit_png_rotated_by_exif_is_turned_like_an_eight_bit_one():
    array = pixels(3, (10, 6), 3, np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    eight = Image.fromarray((array >> 8).astype(np.uint8))
    buffer = io.BytesIO()
    eight.save(buffer, "PNG", exif=exif)
    wide = encode_png(array)
    # the same eXIf chunk in the 16-bit file, before its IEND
    chunk = buffer.getvalue()[buffer.getvalue().index(b"eXIf") - 4:buffer.getvalue().index(b"IEND") - 4]
    wide = wide[:-12] + chunk + wide[-12:]
    turned8 = decode_pixels(buffer.getvalue(), 3).array
    turned16 = decode_pixels(wide, 3).array
    assert turned16.shape == turned8.shape == (10, 6, 3)
    assert np.array_equal((turned16 >> 8).astype(np.uint8), turned8)


def test_a_truncated_sixteen_bit_png_is_a_clear_decode_error():
    from pipeline.pixels import ImageDecodeError

    data = encode_png(pixels(1, (64, 64), 3, np.uint16))
    with pytest.raises(ImageDecodeError) as err:
        decode_pixels(data[: len(data) // 2], 3)
    assert err.value.reason in ("truncated", "corrupt")


# ------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize(("fmt", "mode", "dropped"), [("png", "RGBA", ()), ("webp", "RGBA", ()),
                                                      ("jpg", "RGB", ("alpha",))])
def test_a_kept_alpha_goes_back_beside_the_output_or_is_named_as_dropped(fmt, mode, dropped):
    out = pixels(1, (8, 6), 3)
    alpha = pixels(2, (8, 6), 1)[:, :, 0]
    encoded = encode_image(out, fmt, 95, alpha=alpha)
    assert (encoded.mode, encoded.dropped) == (mode, dropped)
    img = Image.open(io.BytesIO(encoded.data))
    assert img.mode == mode
    if fmt == "png":
        assert np.array_equal(np.asarray(img)[:, :, 3], alpha)


# ------------------------------------------------------------------------------------------ jobs.infer
def test_rgba_inputs_to_an_rgb_model_keep_their_alpha_unchanged(tmp_path):
    src = folder_of(tmp_path / "in", 3, 4)
    ckpt = generator_file(tmp_path / "g.pt")
    rows = infer(ckpt, src, tmp_path / "out", "--preprocess", "none")
    assert [r["status"] for r in rows] == ["ok"] * 3
    for row in rows:
        assert (row["source_mode"], row["output_mode"], row["dropped"]) == ("RGBA", "RGBA", None)
        source = np.asarray(opened(row["source_url"]))
        output = np.asarray(opened(row["output_url"]))
        assert output.shape == source.shape
        assert np.array_equal(output[:, :, 3], source[:, :, 3])
    jpg = infer(ckpt, src, tmp_path / "jpg", "--preprocess", "none", "--image-format", "jpg")
    assert {(r["output_mode"], r["dropped"]) for r in jpg} == {("RGB", "alpha")}


def test_grey_and_sixteen_bit_inputs_come_out_in_their_mode_with_the_models_pixels(tmp_path):
    grey = folder_of(tmp_path / "grey16", 2, 1, size=(32, 32), dtype=np.uint16)
    ckpt = generator_file(tmp_path / "g1.pt", 1, 1)
    rows = infer(ckpt, grey, tmp_path / "out")
    netG = generator_from_checkpoint(read_checkpoint(Path(ckpt).read_bytes())).eval()
    for row in rows:
        assert (row["source_mode"], row["output_mode"]) == ("I;16", "L;16")
        img = opened(row["output_url"])
        assert img.mode == "I;16"
        source = decode_pixels(Path(row["source_url"]).read_bytes(), 1).array
        with torch.no_grad():
            expected = to_uint16(netG(from_pixels(inference_pixels(source, "official", 32, 32).unsqueeze(0))))
        assert np.array_equal(np.asarray(img), expected[0, 0].numpy())
    eight = folder_of(tmp_path / "grey8", 2, 1, size=(32, 32))
    rows = infer(ckpt, eight, tmp_path / "out8")
    assert {(r["source_mode"], r["output_mode"]) for r in rows} == {("L", "L")}
    img = np.asarray(opened(rows[0]["output_url"]))
    with torch.no_grad():
        source = decode_pixels(Path(rows[0]["source_url"]).read_bytes(), 1).array
        expected = to_uint8(netG(from_pixels(inference_pixels(source, "official", 32, 32).unsqueeze(0))))
    assert np.array_equal(img, expected[0, 0].numpy())
    rgb16 = folder_of(tmp_path / "rgb16", 1, 3, size=(32, 32), dtype=np.uint16)
    rows = infer(generator_file(tmp_path / "g3.pt"), rgb16, tmp_path / "rgb16-out")
    assert (rows[0]["source_mode"], rows[0]["output_mode"]) == ("RGB;16", "RGB;16")
    assert decode_pixels(Path(rows[0]["output_url"]).read_bytes(), 3).array.dtype == np.uint16


# ------------------------------------------------------------------------------------------ training
@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 4])
def test_grey_and_rgba_shards_train_and_translate_in_their_mode(tmp_path, channels):
    domains = sharded_domains(tmp_path, "png", lambda seed: encode_png(pixels(seed, (40, 36), channels)))
    with tarfile.open(tmp_path / "A" / "A-000000.tar") as tar:  # shards keep the source's mode
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        assert Image.open(tar.extractfile(member)).mode == MODES[channels]
    run_url = tmp_path / "run"
    run(["-m", "jobs.train", "--config", "configs/tiny.yaml", f"data.a={domains['A']}",
         f"data.b={domains['B']}", f"run.url={run_url}", f"model.input_nc={channels}",
         f"model.output_nc={channels}", "train.max_steps=3"])
    rows = infer(str(run_url), tmp_path / "src-A", tmp_path / "out")
    assert {(r["source_mode"], r["output_mode"]) for r in rows} == {(MODES[channels], MODES[channels])}
    assert opened(rows[0]["output_url"]).mode == MODES[channels]


def test_the_config_names_bad_channel_counts_and_identity_across_channel_counts(tmp_path):
    base = [f"data.a={tmp_path}", f"data.b={tmp_path}", f"run.url={tmp_path / 'run'}"]

    def load(*overrides: str) -> TrainConfig:
        return resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [*base, *overrides]))

    with pytest.raises(ConfigError, match=r"'model\.input_nc' must be >= 1"):
        load("model.input_nc=0")
    with pytest.raises(ConfigError, match=r"'model\.output_nc' must be >= 1"):
        load("model.output_nc=0", "model.nce_idt=false")
    assert load("model.input_nc=5", "model.output_nc=5").model.input_nc == 5  # .npy arrays
    with pytest.raises(ConfigError, match=r"model\.nce_idt"):
        load("model.input_nc=1")
    config = load("model.input_nc=1", "model.nce_idt=false")
    assert (config.model.input_nc, config.model.output_nc) == (1, 3)


# ------------------------------------------------------------------------------------------ any channel count
def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_npy_arrays_hold_any_channel_count_and_hostile_ones_are_refused():
    from pipeline.pixels import ImageDecodeError, inspect_image

    array = pixels(4, (7, 5), 6, np.uint16)
    data = npy_bytes(array)
    assert (inspect_image(data).format, inspect_image(data).width) == ("NPY", 7)
    decoded = decode_pixels(data, 6)
    assert decoded.source_mode == "6ch;16" and np.array_equal(decoded.array, array)
    with pytest.raises(ImageDecodeError) as err:
        decode_pixels(data, 3)
    assert err.value.reason == "channel-mismatch"
    rgba = pixels(5, (7, 5), 4)  # 1-4 channel arrays convert as their image modes do
    assert np.array_equal(decode_pixels(npy_bytes(rgba), 3).alpha, rgba[:, :, 3])
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    bad = {"pickled objects": buffer.getvalue(), "truncated": data[: len(data) // 2],
           "floats": npy_bytes(np.zeros((4, 4), np.float32))}
    for name, payload in bad.items():
        with pytest.raises(ImageDecodeError) as err:
            decode_pixels(payload, 6)
        assert err.value.reason in ("corrupt", "truncated"), name


@pytest.mark.slow
def test_a_five_channel_model_trains_on_npy_shards_and_writes_npy(tmp_path):
    domains = sharded_domains(tmp_path, "npy", lambda seed: npy_bytes(pixels(seed, (40, 36), 5)))
    run_url = tmp_path / "run"
    run(["-m", "jobs.train", "--config", "configs/tiny.yaml", f"data.a={domains['A']}",
         f"data.b={domains['B']}", f"run.url={run_url}", "model.input_nc=5", "model.output_nc=5",
         "train.max_steps=2"])
    rows = infer(str(run_url), tmp_path / "src-A", tmp_path / "out", "--image-format", "npy")
    assert {(r["status"], r["source_mode"], r["output_mode"]) for r in rows} == {("ok", "5ch", "5ch")}
    assert np.load(rows[0]["output_url"]).shape == (32, 32, 5)
    refused = run_main(infer_main, "--no-progress", "--checkpoint", str(run_url), "--input",
                       str(tmp_path / "src-A"), "--out", str(tmp_path / "png"))
    assert refused.returncode != 0 and "--image-format npy" in refused.stderr
    rgb_rows = infer(generator_file(tmp_path / "g.pt"), tmp_path / "src-A", tmp_path / "rgb")
    assert {r["error"] for r in rgb_rows} == {"channel-mismatch"}
