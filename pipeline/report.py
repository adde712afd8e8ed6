"""The evaluation report: OUT/metrics.json, OUT/per_image.parquet, OUT/report.html (the scores table,
the classifier's accuracy, warnings, a gallery of input beside output, a row of real B), OUT/grid.png,
OUT/samples/*.png and OUT/real_b/*.png, and the same table as text for the log. It knows images and
numbers, not models: the metrics dict jobs.eval builds, and images as (3, H, W) tensors in [-1, 1].

metrics.json holds each number once:

- top level, the headline numbers: ``translation_score``, ``content_score``, ``domain_score``, ``fid``,
  ``kid`` of the translated images; ``identity_<same>`` of the inputs returned unchanged (the
  baseline); ``real_b_domain_score``; ``classifier_accuracy`` (the classifier's held-out accuracy);
  ``domain_saturated`` (every output has P(B) >= 0.99, so the domain score ranks nothing);
- ``translated``, ``baseline`` (null with --no-baseline), ``real_b`` (null without --test-b): the rest
  of each column, its image ``count`` and ``kid_std``;
- ``domain_classifier``: the classifier's file and metadata (its accuracy per domain, what it trained
  on) less the headline accuracy; ``unavailable``, ``warnings``, ``rejected``, ``rejections``,
  ``inception_weights``, ``config``.
"""

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


HEADLINE = ("translation_score", "content_score", "domain_score", "fid", "kid")
SATURATED = 0.99  # P(B) of every output at or above this: the domain score cannot rank the outputs
CLASSIFIER_PRIVATE = ("test_accuracy", "train_b_sha256")  # at the top level, or too long to show


def metrics_scores(translated: dict[str, float], identity: dict[str, float] | None,
                   real_b: dict[str, float] | None, classifier: dict[str, Any]) -> dict[str, Any]:
    """The score part of metrics.json, each number once (see the module docstring)."""
    out: dict[str, Any] = {name: translated[name] for name in HEADLINE if name in translated}
    out["translated"] = {k: v for k, v in translated.items() if k not in HEADLINE}
    out["baseline"] = None
    if identity is not None:
        out.update({f"identity_{name}": identity[name] for name in HEADLINE if name in identity})
        out["baseline"] = {k: v for k, v in identity.items() if k not in HEADLINE}
    out["real_b"] = None
    if real_b is not None:
        if "domain_score" in real_b:
            out["real_b_domain_score"] = real_b["domain_score"]
        out["real_b"] = {k: v for k, v in real_b.items() if k != "domain_score"}
    if classifier.get("test_accuracy") is not None:
        out["classifier_accuracy"] = classifier["test_accuracy"]
    out["domain_classifier"] = {k: v for k, v in classifier.items() if k not in CLASSIFIER_PRIVATE} or None
    return out


def column(metrics: dict[str, Any], name: str) -> dict[str, float] | None:
    """The full scores of one table column (translated, baseline, real_b) from metrics.json."""
    rest = metrics.get(name)
    if rest is None:
        return None
    if name == "real_b":
        flat = {"domain_score": metrics["real_b_domain_score"]} if "real_b_domain_score" in metrics else {}
    else:
        prefix = "identity_" if name == "baseline" else ""
        flat = {k: metrics[prefix + k] for k in HEADLINE if prefix + k in metrics}
    return {**rest, **flat}


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
    named = (("translated", column(metrics, "translated")),
             ("identity (inputs)", column(metrics, "baseline")), ("real B", column(metrics, "real_b")))
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
    shown = {"fid": "FID", "kid": "KID", "domain": "domain score"}
    return [(" and ".join(shown.get(n, n) for n in names), reason) for reason, names in by_reason.items()]


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics table as text, then which metric is missing (why: in the log and the report, once)."""
    rows = table_rows(metrics)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"{names} unavailable (why: the warning above, and report.html)"
              for names, _ in unavailable_notes(metrics)]
    if note := saturation_note(metrics):
        lines.append(note)
    if note := rejected_note(metrics):
        lines.append(note)
    if about := classifier_note(metrics["domain_classifier"], metrics.get("classifier_accuracy")):
        lines.append(about)
    lines += [f"WARNING: {warning}" for warning in metrics["warnings"]]
    return "\n".join(lines)


def saturation_note(metrics: dict[str, Any]) -> str:
    """What a saturated domain score means ("" when it is not saturated)."""
    if not metrics.get("domain_saturated"):
        return ""
    return (f"domain score saturated: the classifier gives every output P(B) >= {SATURATED}, so it tells "
            f"these outputs apart from nothing; the translation score (the lower of P(B) and the content "
            f"score) is then the content score, and ranks the outputs by the layout they keep alone")


def rejected_note(metrics: dict[str, Any]) -> str:
    """One line on the manifest rows left out of scoring ("" if none)."""
    rejections = metrics.get("rejections") or {}
    if not rejections:
        return ""
    summary = rejection_summary(r["reason"] for r in rejections.values())
    return f"{len(rejections)} manifest rows rejected, not scored ({summary}): see rejections in metrics.json"


def classifier_note(meta: dict[str, Any] | None, accuracy: float | None = None) -> str:
    """One line on the domain classifier behind the domain and translation scores ("" if none)."""
    if not meta:
        return ""
    return f"domain classifier: {accuracy_text(meta, accuracy)}"


def accuracy_text(meta: dict[str, Any], accuracy: float | None = None) -> str:
    """'held-out accuracy 0.912 (A 0.900; B 0.925; where it was measured)', or that it is unknown."""
    accuracy = meta.get("test_accuracy", accuracy)
    if accuracy is None:
        return "held-out accuracy unknown"
    parts = [f"{d} {meta[f'test_accuracy_{d.lower()}']:.3f}" for d in "AB"
             if f"test_accuracy_{d.lower()}" in meta]
    parts.append(meta.get("held_out", "held-out images"))
    return f"held-out accuracy {accuracy:.3f} ({'; '.join(parts)})"


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


def _gallery_columns(metrics: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(heading, per-image score) of the gallery: P(B) and the translation score only when they say
    something beyond the content score (not when the domain score saturates)."""
    if metrics.get("domain_saturated"):
        return (("content", "content_score"),)
    return (("translation", "translation_score"), ("content", "content_score"),
            ("P(B)", "domain_probability"))


def write_report(out: str, metrics: dict[str, Any], samples: list[Sample],
                 per_image: dict[str, list[float]], real_b: list[torch.Tensor] | None = None) -> None:
    """metrics.json, grid.png, samples/NNN-{input,output}.png, real_b/NNN.png and report.html: the scores
    table, the classifier's accuracy, warnings, a gallery of input beside output with each pair's scores
    (``per_image``: the meter's per-image scores, whose first entries are the samples'), and a row of
    real B images (``real_b``) to compare the outputs with."""
    storage.write_bytes_atomic(storage.join(out, "metrics.json"),
                               (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    figure, pairs = "", []
    if samples:
        storage.write_bytes_atomic(storage.join(out, "grid.png"), png_bytes(grid_image(samples)))
        figure = '<img src="grid.png" alt="inputs above their translations">'
    shown = _gallery_columns(metrics)
    for i, sample in enumerate(samples):
        cells = []
        for role, image in (("input", sample.input), ("output", sample.output)):
            if image is None:
                cells.append("<td>input unavailable</td>")
                continue
            name = f"samples/{i:03d}-{role}.png"
            storage.write_bytes_atomic(storage.join(out, name), png_bytes(to_pixels(image)))
            cells.append(f'<td><img src="{name}" class="pair" alt="{role} {html.escape(sample.key)}"></td>')
        scores = "".join(f"<td>{_cell(per_image, n, i)}</td>" for _, n in shown)
        pairs.append(f"<tr><td>{html.escape(sample.key)}</td>{''.join(cells)}{scores}</tr>")
    real = []
    for i, image in enumerate(real_b or ()):
        name = f"real_b/{i:03d}.png"
        storage.write_bytes_atomic(storage.join(out, name), png_bytes(to_pixels(image)))
        real.append(f'<img src="{name}" class="pair" alt="real B {i}">')
    real_row = (f"<h2>Real B</h2><p>Images of --test-b, for comparison with the outputs.</p>"
                f"<p>{' '.join(real)}</p>\n") if real else ""
    rows = table_rows(metrics)
    table = "".join("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"
                    for tag, row in (("th" if i == 0 else "td", row) for i, row in enumerate(rows)))
    notes = "".join(f"<p><b>{html.escape(names)} unavailable:</b> {html.escape(reason)}</p>"
                    for names, reason in unavailable_notes(metrics))
    if saturated := saturation_note(metrics):
        notes += f"<p><b>{html.escape(saturated)}.</b></p>"
    about = classifier_note(metrics["domain_classifier"], metrics.get("classifier_accuracy"))
    about = f"<p>{html.escape(about)}</p>" if about else ""
    if rejected := rejected_note(metrics):
        about += f'<p class="warning">{html.escape(rejected)}</p>'
    warnings = "".join(f'<p class="warning"><b>Warning:</b> {html.escape(w)}</p>'
                       for w in metrics["warnings"])
    config = metrics["config"]
    source = config["checkpoint"] or config["translated"]
    note = f"<p>{html.escape(config['note'])}</p>" if config.get("note") else ""
    headings = "".join(f"<th>{heading}</th>" for heading, _ in shown)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Translation quality</title>"
        "<style>body{font-family:sans-serif;max-width:70em} td,th{padding:2px 8px;text-align:left}"
        " img{max-width:100%} img.pair{width:160px;image-rendering:pixelated}"
        " .warning{color:#a00}</style></head><body>\n"
        f"<h1>Translation quality</h1><p>{html.escape(source)}</p>\n{note}{warnings}"
        f"<table>{table}</table>\n{notes}{about}<p><small>{html.escape(SCORE_GUIDE)}</small></p>\n"
        f"<h2>Gallery</h2><table><tr><th>key</th><th>input</th><th>output</th>{headings}</tr>"
        f"{''.join(pairs)}</table>\n{real_row}"
        f"<h2>Grid</h2>{figure}\n</body></html>\n")
    storage.write_bytes_atomic(storage.join(out, "report.html"), page.encode())
