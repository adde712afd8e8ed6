"""The evaluation report: OUT/metrics.json, OUT/per_image.parquet, OUT/report.html (the scores table,
the classifier's accuracy, warnings, a gallery of input beside output), OUT/grid.png and
OUT/samples/*.png, and the same table as text for the log. It knows images and numbers, not models:
the metrics dict jobs.eval builds, and the sample pairs as (3, H, W) tensors in [-1, 1]."""

from __future__ import annotations

import html
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline import storage


@dataclass
class Sample:
    """One pair shown in the report."""

    key: str
    input: torch.Tensor | None
    output: torch.Tensor


def rejection_summary(reasons: Iterable[str]) -> str:
    """'2 output-outside, 1 sha256-mismatch': how many rows were left out, by reason code."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(Counter(reasons).items()))


def write_per_image(out: str, keys: list[str], per_image: dict[str, list[float]],
                    identity: dict[str, list[float]]) -> None:
    """OUT/per_image.parquet: one row per scored image, its key and scores (identity_* for its input)."""
    columns: dict[str, list[Any]] = {"key": keys, **per_image}
    if "domain_probability" in identity:
        columns["identity_domain_probability"] = identity["domain_probability"]
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, compression="zstd")
    storage.write_bytes_atomic(storage.join(out, "per_image.parquet"), buffer.getvalue())


ROWS = (("translation score", "translation_score", 1.0), ("content score", "content_score", 1.0),
        ("domain score", "domain_score", 1.0), ("FID", "fid", 1.0), ("KID x 1000", "kid", 1000.0),
        ("images", "count", 1.0))


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """The metrics table: a header, then one row per metric (translated, inputs, real B)."""
    named = (("translated", metrics["translated"]), ("identity (inputs)", metrics["baseline"]),
             ("real B", metrics["real_b"]))
    columns = [(name, scores) for name, scores in named if scores is not None]
    rows = [["metric", *(name for name, _ in columns)]]
    for label, key, scale in ROWS:
        cells = []
        for _, scores in columns:
            value = scores.get(key)
            cells.append("-" if value is None else f"{value * scale:.0f}" if key == "count" else
                         f"{value * scale:.4g}")
        rows.append([label, *cells])
    return rows


def unavailable_notes(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric names, reason) per distinct reason: FID and KID usually share theirs."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in metrics["unavailable"].items():
        by_reason.setdefault(reason, []).append(name)
    return [(" and ".join(names), reason) for reason, names in by_reason.items()]


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics table as text, then why any metric is missing."""
    rows = table_rows(metrics)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"{names} unavailable: {reason}" for names, reason in unavailable_notes(metrics)]
    if note := rejected_note(metrics):
        lines.append(note)
    if about := classifier_note(metrics["domain_classifier"]):
        lines.append(about)
    lines += [f"WARNING: {warning}" for warning in metrics["warnings"]]
    return "\n".join(lines)


def rejected_note(metrics: dict[str, Any]) -> str:
    """One line on the manifest rows left out of scoring ("" if none)."""
    rejections = metrics.get("rejections") or {}
    if not rejections:
        return ""
    summary = rejection_summary(r["reason"] for r in rejections.values())
    return f"{len(rejections)} manifest rows rejected, not scored ({summary}): see rejections in metrics.json"


def classifier_note(meta: dict[str, Any] | None) -> str:
    """One line on the domain classifier behind the domain and translation scores ("" if none)."""
    if not meta:
        return ""
    accuracy = meta.get("test_accuracy")
    if accuracy is None:
        return "domain classifier: held-out accuracy unknown"
    parts = [f"{d} {meta[f'test_accuracy_{d.lower()}']:.3f}" for d in "AB"
             if f"test_accuracy_{d.lower()}" in meta]
    parts.append(meta.get("held_out", "held-out images"))
    return f"domain classifier: held-out accuracy {accuracy:.3f} ({'; '.join(parts)})"


def to_pixels(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] whose values are 8-bit levels, as an RGB image (levels rounded)."""
    pixels = ((image.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def grid_image(samples: list[Sample], per_row: int = 8) -> Image.Image:
    """Rows of up to ``per_row`` inputs, each row followed by the row of their outputs (black if absent)."""
    size = samples[0].output.shape[-1]
    rows = [samples[i:i + per_row] for i in range(0, len(samples), per_row)]
    grid = Image.new("RGB", (size * min(per_row, len(samples)), 2 * size * len(rows)))
    for r, row in enumerate(rows):
        for c, sample in enumerate(row):
            if sample.input is not None:
                grid.paste(to_pixels(sample.input), (c * size, 2 * r * size))
            grid.paste(to_pixels(sample.output), (c * size, (2 * r + 1) * size))
    return grid


SCORE_GUIDE = (
    "Translation score: per image, the lower of the domain classifier's P(B | output) and the content "
    "score; high only when an output looks like domain B and keeps its input. Content score: agreement "
    "of input and output luminance layout at coarse scales (1 = same layout, about 0 = unrelated or "
    "noise). Domain score: share of outputs the classifier puts in B. Identity: the inputs returned "
    "unchanged, the score of doing nothing."
)


def _cell(per_image: dict[str, list[float]], name: str, i: int) -> str:
    values = per_image.get(name)
    return "-" if values is None or i >= len(values) else f"{values[i]:.3f}"


def write_report(out: str, metrics: dict[str, Any], samples: list[Sample],
                 per_image: dict[str, list[float]]) -> None:
    """metrics.json, grid.png, samples/NNN-{input,output}.png and report.html: the scores table, the
    classifier's accuracy, warnings, and a gallery of input beside output with each pair's scores
    (``per_image``: the meter's per-image scores, whose first entries are the samples')."""
    storage.write_bytes_atomic(storage.join(out, "metrics.json"),
                               (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    figure, pairs = "", []
    if samples:
        storage.write_bytes_atomic(storage.join(out, "grid.png"), png_bytes(grid_image(samples)))
        figure = '<img src="grid.png" alt="inputs above their translations">'
    for i, sample in enumerate(samples):
        cells = []
        for role, image in (("input", sample.input), ("output", sample.output)):
            if image is None:
                cells.append("<td>input unavailable</td>")
                continue
            name = f"samples/{i:03d}-{role}.png"
            storage.write_bytes_atomic(storage.join(out, name), png_bytes(to_pixels(image)))
            cells.append(f'<td><img src="{name}" class="pair" alt="{role} {html.escape(sample.key)}"></td>')
        scores = "".join(f"<td>{_cell(per_image, n, i)}</td>"
                         for n in ("translation_score", "content_score", "domain_probability"))
        pairs.append(f"<tr><td>{html.escape(sample.key)}</td>{''.join(cells)}{scores}</tr>")
    rows = table_rows(metrics)
    table = "".join("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"
                    for tag, row in (("th" if i == 0 else "td", row) for i, row in enumerate(rows)))
    notes = "".join(f"<p><b>{html.escape(names)} unavailable:</b> {html.escape(reason)}</p>"
                    for names, reason in unavailable_notes(metrics))
    about = classifier_note(metrics["domain_classifier"])
    about = f"<p>{html.escape(about)}</p>" if about else ""
    if rejected := rejected_note(metrics):
        about += f'<p class="warning">{html.escape(rejected)}</p>'
    warnings = "".join(f'<p class="warning"><b>Warning:</b> {html.escape(w)}</p>'
                       for w in metrics["warnings"])
    config = metrics["config"]
    source = config["checkpoint"] or config["translated"]
    note = f"<p>{html.escape(config['note'])}</p>" if config.get("note") else ""
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Translation quality</title>"
        "<style>body{font-family:sans-serif;max-width:70em} td,th{padding:2px 8px;text-align:left}"
        " img{max-width:100%} img.pair{width:160px;image-rendering:pixelated}"
        " .warning{color:#a00}</style></head><body>\n"
        f"<h1>Translation quality</h1><p>{html.escape(source)}</p>\n{note}{warnings}"
        f"<table>{table}</table>\n{notes}{about}<p><small>{html.escape(SCORE_GUIDE)}</small></p>\n"
        "<h2>Gallery</h2><table><tr><th>key</th><th>input</th><th>output</th><th>translation</th>"
        f"<th>content</th><th>P(B)</th></tr>{''.join(pairs)}</table>\n"
        f"<h2>Grid</h2>{figure}\n</body></html>\n")
    storage.write_bytes_atomic(storage.join(out, "report.html"), page.encode())
