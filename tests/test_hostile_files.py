"""Hostile files (decode bombs, lying headers), symlinks that leave the input, and refused runs.

One file can never end jobs.shard or jobs.infer: whatever a decoder raises on it becomes that file's
reject (jobs.shard) or error row (jobs.infer) with the same code. A symlink in a listed folder is
never followed out of it. A refused run leaves the storage exactly as it found it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import image_bytes
from PIL import Image
from test_infer import write_generator
from test_infer_lake import rows_by_key, run

from jobs import shard as shard_job
from pipeline import storage
from pipeline.pixels import ImageDecodeError, decode_pixels, inspect_image
from pipeline.unpaired import freeze_listing


# ------------------------------------------------------------------------------------ hostile files
def _encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with(*chunks: bytes) -> bytes:
    """A 16x16 PNG with `chunks` between its IHDR (which ends at byte 33) and its pixels."""
    png = _encoded(Image.new("RGB", (16, 16), (200, 10, 10)), "PNG")
    return png[:33] + b"".join(chunks) + png[33:]


def _npy(shape: tuple[int, ...], data: bytes = b"", descr: str = "|u1", fortran: bool = False) -> bytes:
    """An .npy file whose header says what it likes, followed by `data`."""
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape})
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data


def _declaring(data: bytes, at: int, fmt: str, size: tuple[int, int]) -> bytes:
    patched = bytearray(data)
    patched[at:at + struct.calcsize(fmt)] = struct.pack(fmt, *size)
    return bytes(patched)


def _jpeg_declaring(size: tuple[int, int]) -> bytes:
    jpeg = image_bytes(0, (16, 16))
    return _declaring(jpeg, jpeg.index(b"\xff\xc0") + 5, ">HH", (size[1], size[0]))


def _gif_declaring(size: tuple[int, int]) -> bytes:
    gif = _encoded(Image.new("P", (16, 16)), "GIF")
    gif = _declaring(gif, 6, "<HH", size)  # the logical screen
    return _declaring(gif, gif.index(b"\x2c") + 5, "<HH", size)  # the image descriptor


def _tiff_declaring(size: tuple[int, int]) -> bytes:
    tiff = bytearray(_encoded(Image.new("RGB", (16, 16)), "TIFF"))
    ifd = struct.unpack("<I", tiff[4:8])[0]
    for entry in range(struct.unpack("<H", tiff[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * entry
        tag, kind = struct.unpack("<HH", tiff[at:at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            tiff[at + 8:at + 12] = struct.pack("<HH" if kind == 3 else "<I", *(
                (size[tag - 256], 0) if kind == 3 else (size[tag - 256],)))
    return bytes(tiff)


def _frames(fmt: str, count: int) -> bytes:
    frames = [Image.new("RGB", (8, 8), (255 * (i % 2), i % 256, 0)) for i in range(count)]
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:])


def _exif(*entries: tuple[int, int, int, int]) -> bytes:
    """An EXIF block (little-endian TIFF) whose one IFD holds `entries` (tag, type, count, value)."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


_RED = Image.new("RGB", (16, 16), (200, 10, 10))
_ROTATED = (0x0112, 3, 1, 6)  # Orientation 6
_TWO_GIB_TAG = (0x010E, 2, 2**31 - 1, 26)  # an ImageDescription of 2 GiB at offset 26
_TWO_MIB_OF_ZEROS = zlib.compress(bytes(2 << 20), 9)
_ONE_MIB_OF_ZEROS = zlib.compress(bytes((1 << 20) - 64), 9)
_PIXELS = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)

# name -> (bytes, the code every decoder gives it, or None where it decodes as a 16x16 or 8x8 image)
HOSTILE: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "channels-bomb.npy": (lambda: _npy((64, 64, 250_000_000)), "too-large"),
    "sides-bomb.npy": (lambda: _npy((2**40, 2**40)), "too-large"),
    "negative.npy": (lambda: _npy((-4, 4, 3), bytes(48)), "corrupt"),
    "objects.npy": (lambda: _npy((4, 4, 3), descr="|O"), "corrupt"),
    "floats.npy": (lambda: _npy((4, 4, 3), bytes(192), descr="<f4"), "corrupt"),
    "no-header.npy": (lambda: b"\x93NUMPY\x01\x00\x10\x00{'shape': (4,}   \n", "corrupt"),
    "short.npy": (lambda: _npy((4, 4, 3), bytes(10)), "truncated"),
    "long.npy": (lambda: _npy((4, 4, 3), bytes(48 + 4096)), "corrupt"),
    "ztxt-bomb.png": (lambda: _png_with(_chunk(b"zTXt", b"k\0\0" + _TWO_MIB_OF_ZEROS)), "too-large"),
    "itxt-bomb.png": (lambda: _png_with(_chunk(b"iTXt", b"k\0\1\0\0\0" + _TWO_MIB_OF_ZEROS)), "too-large"),
    "iccp-bomb.png": (lambda: _png_with(_chunk(b"iCCP", b"p\0\0" + _TWO_MIB_OF_ZEROS)), "too-large"),
    "text-total-bomb.png": (lambda: _png_with(*(_chunk(b"zTXt", b"k%d\0\0" % i + _ONE_MIB_OF_ZEROS)
                                                for i in range(66))), "too-large"),
    "many-chunks.png": (lambda: _png_with(*[_chunk(b"tEXt", b"k\0v")] * 5000), None),
    "huge-jpeg.jpg": (lambda: _jpeg_declaring((65000, 65000)), "too-large"),
    "over-limit.jpg": (lambda: _jpeg_declaring((9000, 9000)), "too-large"),
    "huge-gif.gif": (lambda: _gif_declaring((65000, 65000)), "too-large"),
    "huge-tiff.tif": (lambda: _tiff_declaring((60000, 60000)), "too-large"),
    "gif-frames.gif": (lambda: _frames("GIF", 2000), None),
    "apng-frames.png": (lambda: _frames("PNG", 2000), None),
    "tiff-pages.tif": (lambda: _frames("TIFF", 2000), None),
    # EXIF: a tag claiming 2 GiB, an IFD pointing at itself, thousands of such tags
    "exif-count.jpg": (lambda: _encoded(_RED, "JPEG", exif=_exif(_TWO_GIB_TAG, _ROTATED)), None),
    "exif-loop.jpg": (lambda: _encoded(_RED, "JPEG", exif=_exif((0x8769, 4, 1, 8), _ROTATED)), None),
    "exif-entries.png": (lambda: _encoded(_RED, "PNG", exif=_exif(*[_TWO_GIB_TAG] * 3000)), None),
}


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes]:
    return {name: make() for name, (make, _) in HOSTILE.items()}


def _code(decode: Callable[[bytes], object], data: bytes) -> str | None:
    try:
        decode(data)
    except ImageDecodeError as exc:
        return exc.reason
    return None


@pytest.mark.filterwarnings("ignore")  # Pillow warns of the broken EXIF tags it skips
def test_every_hostile_file_is_a_decode_error_with_its_code_or_decodes_its_first_frame(
        hostile: dict[str, bytes]) -> None:
    found = {name: (_code(inspect_image, data), _code(lambda d: decode_pixels(d, 3), data))
             for name, data in hostile.items()}
    assert found == {name: (code, code) for name, (_, code) in HOSTILE.items()}
    for name, (_, code) in HOSTILE.items():
        if code is None:
            assert decode_pixels(hostile[name], 3).array.shape[:2] in ((16, 16), (8, 8)), name
    fortran = _npy(_PIXELS.shape, np.asfortranarray(_PIXELS).tobytes(order="F"), fortran=True)
    assert np.array_equal(decode_pixels(fortran, 3).array, _PIXELS)


def _hostile_folder(root: Path, hostile: dict[str, bytes]) -> Path:
    root.mkdir()
    for name, data in hostile.items():
        (root / name).write_bytes(data)
    for i in range(2):
        (root / f"good-{i}.png").write_bytes(image_bytes(i, (32, 32), fmt="PNG"))
    return root


@pytest.mark.filterwarnings("ignore")
def test_jobs_shard_rejects_each_hostile_file_with_its_reason_and_goes_on(
        tmp_path: Path, hostile: dict[str, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    folder = _hostile_folder(tmp_path / "in", hostile)
    out = tmp_path / "set"
    assert shard_job.main([str(folder), "--out", str(out), "--no-progress", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rejects = {Path(r["source_url"]).name: r for r in map(json.loads, (out / "_rejects.jsonl").open())}
    assert {name: r["reason"] for name, r in rejects.items()} == {
        name: code for name, (_, code) in HOSTILE.items() if code}
    assert all(r["detail"] for r in rejects.values())
    assert summary["samples"] == 2 + sum(code is None for _, code in HOSTILE.values())


@pytest.mark.filterwarnings("ignore")
def test_jobs_infer_gives_the_same_hostile_files_error_rows_with_the_same_codes(
        tmp_path: Path, hostile: dict[str, bytes]) -> None:
    folder = _hostile_folder(tmp_path / "in", hostile)
    out = tmp_path / "out"
    ckpt = write_generator(tmp_path / "g.pt")
    assert run("--checkpoint", ckpt, "--input", str(folder), "--out", str(out)) == 0
    rows = rows_by_key(out)
    assert {key: row["error"] for key, row in rows.items() if row["status"] != "ok"} == {
        name.rsplit(".", 1)[0]: code for name, (_, code) in HOSTILE.items() if code}


# ------------------------------------------------------------------------------------------ symlinks
def _linked_input(tmp_path: Path) -> Path:
    """An input folder with a real image, a link to a file and one to a folder outside it (both
    holding images), a link to an image inside it and a link to its own subfolder."""
    outside = tmp_path / "elsewhere"
    (outside / "album").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(image_bytes(7, (32, 32)))
    (outside / "album" / "photo.jpg").write_bytes(image_bytes(8, (32, 32)))
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "real.jpg").write_bytes(image_bytes(9, (32, 32)))
    (folder / "secret.jpg").symlink_to(outside / "secret.jpg")
    (folder / "album").symlink_to(outside / "album", target_is_directory=True)
    (folder / "inner.jpg").symlink_to(Path("sub") / "real.jpg")
    (folder / "again").symlink_to("sub", target_is_directory=True)
    return folder


def test_jobs_shard_refuses_symlinks_out_of_the_input_as_outside_input_rejects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _linked_input(tmp_path)
    out = tmp_path / "set"
    assert shard_job.main([str(folder), "--out", str(out), "--no-progress"]) == 0
    rejects = {Path(r["source_url"]).name: r for r in map(json.loads, (out / "_rejects.jsonl").open())}
    assert {name: r["reason"] for name, r in rejects.items()} == {"secret.jpg": "outside-input",
                                                                  "album": "outside-input"}
    assert str(tmp_path / "elsewhere" / "secret.jpg") in rejects["secret.jpg"]["detail"]
    index = json.loads((out / "_index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 2  # sub/real.jpg, and inner.jpg, the link to it
    log = capsys.readouterr().err
    assert "2 symlinks lead outside it" in log and "1 symlinks to folders inside" in log


def test_jobs_infer_gives_symlinks_out_of_the_input_outside_input_rows_and_reads_nothing_there(
        tmp_path: Path) -> None:
    folder = _linked_input(tmp_path)
    out = tmp_path / "out"
    ckpt = write_generator(tmp_path / "g.pt")
    assert run("--checkpoint", ckpt, "--input", str(folder), "--out", str(out)) == 0
    rows = rows_by_key(out)
    assert {k: (r["status"], r["error"]) for k, r in rows.items()} == {
        "secret": ("error", "outside-input"), "album": ("error", "outside-input"),
        "inner": ("ok", None), "sub/real": ("ok", None)}
    assert rows["secret"]["input_bytes"] in (0, None)


def test_a_planned_file_that_became_a_symlink_out_of_the_input_is_refused_when_read(tmp_path: Path) -> None:
    ckpt = write_generator(tmp_path / "g.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(image_bytes(0, (32, 32), fmt="PNG"))
    (tmp_path / "secret.png").write_bytes(image_bytes(1, (32, 32), fmt="PNG"))
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(folder), "--out", str(out), "--unit-size", "1",
            "--num-workers", "2"]
    assert run(*args, "--worker-index", "0") == 0  # plans both files, translates a.png
    (folder / "b.png").unlink()
    (folder / "b.png").symlink_to(tmp_path / "secret.png")
    assert run(*args, "--worker-index", "1") == 0
    rows = rows_by_key(out)
    assert (rows["b"]["error"], rows["a"]["status"]) == ("outside-input", "ok")
    assert str(tmp_path / "secret.png") in rows["b"]["error_detail"]


def test_a_training_listing_leaves_out_symlinks_out_of_the_folder(tmp_path: Path) -> None:
    folder = _linked_input(tmp_path)
    urls = freeze_listing(str(folder), str(tmp_path / "frozen.txt"))
    assert sorted(Path(u).name for u in urls) == ["inner.jpg", "real.jpg"]


def test_link_leaving_names_the_target_of_links_out_of_the_folder_only(tmp_path: Path) -> None:
    folder = _linked_input(tmp_path)
    leaves = storage.link_leaving(str(folder))
    assert leaves(str(folder / "secret.jpg")) == str(tmp_path / "elsewhere" / "secret.jpg")
    assert leaves(str(folder / "album")) == str(tmp_path / "elsewhere" / "album")
    assert leaves(str(folder / "inner.jpg")) == leaves(str(folder / "sub" / "real.jpg")) == ""
    assert storage.is_folder_link(str(folder / "again")) and not storage.is_folder_link(str(folder / "sub"))


# ------------------------------------------------------------------------------------------ refusals
def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every folder (None), file (its bytes) and symlink (its target) under `root`."""
    tree: dict[str, bytes | str | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            is_folder = path.is_dir() and not path.is_symlink()
            tree[key] = os.readlink(path) if path.is_symlink() else None if is_folder else path.read_bytes()
    return tree


def test_every_refused_jobs_infer_run_leaves_the_storage_as_it_was(tmp_path: Path) -> None:
    ckpt = write_generator(tmp_path / "g.pt")
    other = write_generator(tmp_path / "other.pt", seed=1)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes(0, (32, 32), fmt="PNG"))
    done = tmp_path / "done"
    assert run("--checkpoint", ckpt, "--input", str(folder), "--out", str(done)) == 0
    (folder / "b.png").write_bytes(image_bytes(1, (32, 32), fmt="PNG"))  # the inputs changed since
    (done / "nested").mkdir()
    (done / "nested" / "c.png").write_bytes(image_bytes(2, (32, 32), fmt="PNG"))
    refusals = {
        "--out equal to the input": ["--input", str(folder), "--out", str(folder)],
        "--out equal to the input, spelt with a slash": ["--input", str(folder), "--out", f"{folder}/"],
        "an input nested in --out": ["--input", str(done / "nested"), "--out", str(done)],
        "a missing input": ["--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new")],
        "a missing input, --out existing": ["--input", str(tmp_path / "nowhere"), "--out", str(folder)],
        "a glob matching nothing": ["--input", f"{tmp_path}/nowhere/*.png", "--out", str(tmp_path / "new")],
        "an input given twice": ["--input", str(folder), str(folder), "--out", str(tmp_path / "new")],
        "the inputs changed": ["--input", str(folder), "--out", str(done)],
        "another model": ["--checkpoint", other, "--input", str(folder), "--out", str(done),
                          "--skip-input-check"],
        "a bad flag": ["--input", str(folder), "--out", str(tmp_path / "new"), "--unit-size", "0"],
    }
    for what, argv in refusals.items():
        before = snapshot(tmp_path)
        args = argv if "--checkpoint" in argv else ["--checkpoint", ckpt, *argv]
        try:
            code = run(*args)
        except SystemExit as exc:  # argparse's refusal
            code = exc.code
        assert code == 2, what  # a refusal: the same arguments fail the same way
        assert snapshot(tmp_path) == before, what


def test_every_refused_jobs_shard_run_leaves_the_storage_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes(0, (32, 32), fmt="PNG"))
    built = tmp_path / "set"
    assert shard_job.main([str(folder), "--out", str(built), "--no-progress"]) == 0
    (built / "extra").mkdir()
    (built / "extra" / "c.png").write_bytes(image_bytes(2, (32, 32), fmt="PNG"))
    refusals = {
        "--out equal to the SOURCE": [str(folder), "--out", str(folder)],
        "a SOURCE nested in --out": [str(built / "extra"), "--out", str(built), "--overwrite"],
        "a glob nested in --out": [f"{built}/extra/*.png", "--out", str(built), "--overwrite"],
        "a missing SOURCE": [str(tmp_path / "nowhere"), "--out", str(tmp_path / "new")],
        "a glob matching nothing": [f"{folder}/*.webp", "--out", str(tmp_path / "new")],
        "an existing set without --overwrite": [str(folder), "--out", str(built)],
        "a bad --max-count": [str(folder), "--out", str(tmp_path / "new"), "--max-count", "0"],
        "a bad --workers": [str(folder), "--out", str(tmp_path / "new"), "--workers", "-1"],
    }
    for what, argv in refusals.items():
        before = snapshot(tmp_path)
        try:
            code = shard_job.main([*argv, "--no-progress"])
        except SystemExit as exc:
            code = exc.code
        assert code == 2, what
        assert snapshot(tmp_path) == before, what
