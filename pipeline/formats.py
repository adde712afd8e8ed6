"""Which files are images, by name: one list for jobs.shard, jobs.infer and every reader.

``DECODED``: extensions whose files this project decodes (with Pillow; multi-frame formats such as
GIF, APNG or multi-page TIFF give their first frame; ``npy``: NumPy arrays (H, W) or (H, W, C) of
uint8 or uint16, read without pickles, for any channel count). ``UNSUPPORTED``: image formats recognised by
name but not decoded here; they become rejects or error rows (``unsupported-format``), never a
silent gap. Any other file is not an image: listings skip it and say how many they skipped.
"""

from __future__ import annotations

import posixpath

DECODED = frozenset({
    "jpg", "jpeg", "jpe", "jfif", "png", "apng", "webp", "gif", "bmp", "dib", "tif", "tiff",
    "ppm", "pgm", "pbm", "pnm", "tga", "qoi", "avif", "jp2", "j2k", "npy",
})
UNSUPPORTED = frozenset({
    "heic", "heif", "jxl", "svg", "eps", "psd", "ico", "exr", "hdr", "raw", "cr2", "cr3", "nef", "arw",
    "dng", "orf", "rw2",
})

# Pillow's format names of the decoded formats, and the member extension a shard stores each under.
MEMBER_EXTENSIONS = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "DIB": "bmp",
    "TIFF": "tif", "PPM": "ppm", "TGA": "tga", "QOI": "qoi", "AVIF": "avif", "JPEG2000": "jp2", "NPY": "npy",
}


def extension(name: str) -> str:
    """The lower-case extension of a file name or URL, without the dot ("" if none)."""
    return posixpath.splitext(name)[1][1:].lower()


def is_image_name(name: str) -> bool:
    """Whether the name says image, decodable here or not."""
    ext = extension(name)
    return ext in DECODED or ext in UNSUPPORTED


def unsupported_detail(name: str) -> str:
    return f"{extension(name)} images are not decoded by this project (decoded: {', '.join(sorted(DECODED))})"
