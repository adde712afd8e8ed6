"""Translation quality as numbers and pictures: FID, KID, domain, content and translation scores.

    python -m jobs.eval --checkpoint s3://b/runs/h2z/export/generator.pt \\
        --test-a s3://b/h2z/testA --test-b s3://b/h2z/testB --out s3://b/evals/h2z \\
        --domain-classifier s3://b/h2z/domain.pt --train-a s3://b/h2z/trainA --train-b s3://b/h2z/trainB
    python -m jobs.eval --translated s3://b/translated/h2z --test-b s3://b/h2z/testB --out ...
    python -m jobs.eval --train-classifier-only --domain-classifier s3://b/h2z/domain.pt \
        --train-a s3://b/h2z/trainA --train-b s3://b/h2z/trainB --test-a ... --test-b ...

The translated images come from a generator (--checkpoint, applied to --test-a with the official test
preprocessing) or from an inference output folder (--translated; its manifest names each output and
its input). They are scored against real domain B (--test-b, or saved --reference-stats), and so are
the untranslated inputs, as a baseline. Images of every source get the official test preprocessing
(bicubic resize to --crop-size). Sources: shard sets, folders, prefixes, globs, URL lists.

A --translated manifest is data, not trusted: a row is scored only if its output lies under the
translated set (no other store, scheme or host, no '..' or symlink leading out) and its bytes hash to
its output_sha256, and its input lies under --inputs (default --test-a). Nothing else is fetched. The
rows that fail are named in the log and in metrics.json ("rejected", "rejections"), and never scored
or shown; when no row is left to score the job exits 2.

FID and KID need the FID Inception weights (pt_inception-2015-12-05-6726825d.pth): --inception-weights,
else $CUT_INCEPTION_WEIGHTS, else the torch hub cache, downloaded there when possible. Without them
FID and KID are reported as unavailable, with the reason, unless --metrics asks for them (then the
job fails). The domain score (share of translated images a small classifier puts in B) needs
--domain-classifier; one is trained with --train-a/--train-b when that file does not exist yet
(and saved there). Its held-out accuracy (on --test-a/--test-b, else on a tenth of the training
images kept aside) is reported beside every domain score, with a warning below 0.8. The content
score (does the output keep its input's layout) needs no weights; the translation score is, per
image, the lower of P(B | output) and the content score: high only for outputs that look like B and
keep their input (docs/quality.md).

Outputs: OUT/metrics.json (headline scores at its top level), OUT/per_image.parquet (scores of each
image), OUT/report.html, OUT/grid.png, OUT/samples/*.png; a table on stdout.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from cut import CheckpointError, generator_from_checkpoint, read_checkpoint
from cut.checkpoint import to_bytes
from cut.domain import (
    IMAGE_SIZE,
    DomainClassifier,
    domain_accuracy,
    downscale,
    export_classifier,
    train_domain_classifier,
)
from cut.inception import (
    WEIGHTS_NAME,
    FIDInception,
    InceptionWeightsError,
)
from cut.metrics import FeatureStats, QualityMeter, as_rgb, quantize
from jobs.cli import HelpFormatter, add_logging_arguments, run_job
from jobs.config import ConfigError, build
from jobs.logs import setup_logging
from jobs.quality import (
    classifier_warning,
    inception_weights_source,
    load_domain_classifier,
    load_inception,
)
from jobs.runtime import reuse_freed_memory
from pipeline import storage
from pipeline.checkpoints import resolve_generator_url
from pipeline.images import (
    Confinement,
    Rejection,
    TranslatedPair,
    batched,
    decode_for_eval,
    image_batches,
    iter_encoded,
    read_outputs,
    read_urls,
    screen_pairs,
    translated_pairs,
)
from pipeline.ingest import ListingError
from pipeline.shards import ShardIndexError

log = logging.getLogger("jobs.eval")

METRICS = ("fid", "kid", "domain")
HELD_OUT_SHARE = 0.1  # of the training images, kept aside to measure a classifier trained without test sets
PAIR_CHUNK = 256  # inference outputs read (with their inputs) per chunk


class UnavailableError(RuntimeError):
    """A metric cannot be computed with what this run was given."""


class NothingToScoreError(RuntimeError):
    """Every successful row of a --translated manifest was rejected or unreadable."""


@dataclass
class EvalConfig:
    """One evaluation: the command line's options, validated by ``jobs.config.build``."""

    checkpoint: str = ""
    translated: str = ""
    inputs: list[str] | None = None
    train_classifier_only: bool = False
    test_a: str = ""
    test_b: str = ""
    out: str = ""
    metrics: list[str] | None = None
    domain_classifier: str = ""
    train_a: str = ""
    train_b: str = ""
    classifier_epochs: int = 20
    classifier_max_images: int = 5000
    inception_weights: str = ""
    download: bool = True
    reference_stats: str = ""
    baseline: bool = True
    crop_size: int = 256
    batch_size: int = 16
    samples: int = 8
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    device: str = "auto"
    note: str = ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.eval", description=__doc__,
                                formatter_class=HelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--checkpoint",
        help="generator to evaluate: our export, latest_net_G.pth, a training state.pt or a run folder",
    )
    what.add_argument("--translated", help="inference output folder (OUT/manifest/*.parquet, OUT/images/...)")
    p.add_argument("--inputs", nargs="+", metavar="URL",
                   help="with --translated: the folders, prefixes or shard sets its inputs may be read from "
                   "(jobs.infer's --input); a manifest row whose source_url lies elsewhere is rejected, "
                   "not read (default: --test-a)")
    what.add_argument("--train-classifier-only", action="store_true",
                      help="train a domain classifier on --train-a/--train-b, save it to --domain-classifier "
                      "and stop (its held-out accuracy is in the file and the log)")
    p.add_argument("--test-a", help="real domain A test images: what --checkpoint translates, and the A test "
                   "set of a domain classifier trained here")
    p.add_argument("--test-b", help="real domain B images (reference for FID/KID; domain classifier test)")
    p.add_argument("--out", help="report folder URL (not used by --train-classifier-only)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                   help="compute these, and fail if one cannot be computed (default: every metric available)")
    p.add_argument("--domain-classifier", help="domain classifier file (trained and saved here if absent "
                   "and --train-a/--train-b are given)")
    p.add_argument("--train-a", help="real domain A training images for the domain classifier")
    p.add_argument("--train-b", help="real domain B training images for the domain classifier")
    p.add_argument("--classifier-epochs", type=int, default=20, help="epochs of the domain classifier")
    p.add_argument("--classifier-max-images", type=int, default=5000, help="training images per domain")
    p.add_argument("--inception-weights", help=f"path or URL of {WEIGHTS_NAME} (default: torch hub cache)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never try to download the Inception weights")
    p.add_argument("--reference-stats", help="Inception statistics of --test-b (.npz): reused when present, "
                   "written when computed")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip scoring the untranslated inputs")
    p.add_argument("--crop-size", type=int, default=256, help="images are resized to this square size")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch through G and the scorers")
    p.add_argument("--samples", type=int, default=8, help="input/output pairs shown in the report")
    p.add_argument("--kid-subsets", type=int, default=100, help="random subsets KID averages over")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="images per KID subset (at most all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the classifier and the KID subsets")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if any")
    p.add_argument("--note", help="a line of text shown at the top of the report (what was evaluated, why)")
    add_logging_arguments(p)
    return p


def load_eval_config(args: argparse.Namespace) -> EvalConfig:
    """The validated config of a parsed command line."""
    options = {k: v for k, v in vars(args).items() if k != "log_format"}
    data = {k: ("" if v is None and k not in ("metrics", "inputs") else v) for k, v in options.items()}
    config = build(EvalConfig, data, "command line")
    only = config.train_classifier_only
    checks = [
        ("--out", bool(config.out) or only, "given"),
        ("--test-a", bool(config.test_a) or not config.checkpoint, "given with --checkpoint"),
        ("--inputs", bool(config.inputs or config.test_a) or not config.translated,
         "given with --translated (where its inputs may be read: jobs.infer's --input), or --test-a"),
        ("--inputs", not config.inputs or bool(config.translated), "given only with --translated"),
        ("--test-b", bool(config.test_b or config.reference_stats) or only, "given (or --reference-stats)"),
        ("--train-b", bool(config.train_a) == bool(config.train_b), "given together with --train-a"),
        ("--train-a", bool(config.train_a) or not only, "given with --train-classifier-only"),
        ("--domain-classifier", bool(config.domain_classifier) or not only,
         "given with --train-classifier-only (where to save it)"),
        ("--test-b", bool(config.test_a) == bool(config.test_b) or not only,
         "given together with --test-a for the classifier's held-out accuracy"),
        ("--crop-size", config.crop_size >= 16 and config.crop_size % 4 == 0, "a multiple of 4, at least 16"),
        ("--batch-size", config.batch_size >= 1, ">= 1"),
        ("--samples", config.samples >= 0, ">= 0"),
        ("--kid-subsets", config.kid_subsets >= 1, ">= 1"),
        ("--kid-subset-size", config.kid_subset_size >= 2, ">= 2"),
        ("--classifier-epochs", config.classifier_epochs >= 1, ">= 1"),
        ("--classifier-max-images", config.classifier_max_images >= 1, ">= 1"),
    ]
    for flag, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {expected}")
    return config


def load_images(url: str, crop_size: int, size: int, limit: int | None = None) -> torch.Tensor:
    """Up to ``limit`` images of a source, test-preprocessed at ``crop_size`` then downscaled to ``size``."""
    batches = [downscale(x, size) for x in image_batches(url, crop_size, 64)]
    if not batches:
        raise FileNotFoundError(f"no readable images in {url}")
    return torch.cat(batches)[:limit]


def held_out_split(images: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): a seeded random ``share`` of ``images`` (at least one image) kept aside."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    count = max(1, round(share * len(images)))
    return images[order[count:]], images[order[:count]]


def train_classifier(config: EvalConfig, device: torch.device) -> tuple[DomainClassifier, dict[str, Any]]:
    """Train a domain classifier on --train-a/--train-b; metadata holds its held-out accuracy, on the
    real test sets when given, else on a tenth of the training images kept out of its training."""
    start = time.perf_counter()
    limit = config.classifier_max_images
    train_a = load_images(config.train_a, config.crop_size, IMAGE_SIZE, limit)
    train_b = load_images(config.train_b, config.crop_size, IMAGE_SIZE, limit)
    if config.test_a and config.test_b:
        held_out = "test images (--test-a, --test-b)"
        test_a = load_images(config.test_a, config.crop_size, IMAGE_SIZE)
        test_b = load_images(config.test_b, config.crop_size, IMAGE_SIZE)
    elif min(len(train_a), len(train_b)) >= 2:
        held_out = f"{HELD_OUT_SHARE:.0%} of the training images, kept out of training"
        train_a, test_a = held_out_split(train_a, HELD_OUT_SHARE, config.seed)
        train_b, test_b = held_out_split(train_b, HELD_OUT_SHARE, config.seed + 1)
    else:
        held_out, test_a, test_b = "", None, None
    log.info("domain classifier: training on %d A and %d B images", len(train_a), len(train_b))
    net = train_domain_classifier(
        train_a, train_b, epochs=config.classifier_epochs, seed=config.seed, device=device,
        on_epoch=lambda epoch, loss: log.info("domain classifier epoch %d: loss %.4f", epoch + 1, loss))
    meta: dict[str, Any] = {"train_a": config.train_a, "train_b": config.train_b,
                            "train_images_a": len(train_a), "train_images_b": len(train_b),
                            "image_size": IMAGE_SIZE, "crop_size": config.crop_size,
                            "epochs": config.classifier_epochs,
                            "train_seconds": round(time.perf_counter() - start, 1)}
    if test_a is not None and test_b is not None:
        accuracy = domain_accuracy(net.to(device), test_a.to(device), test_b.to(device))
        meta.update({f"test_{k}": v for k, v in accuracy.items()}, test_images_a=len(test_a),
                    test_images_b=len(test_b), held_out=held_out)
        log.info("domain classifier: held-out accuracy %.3f (A %.3f on %d, B %.3f on %d; %s)",
                 accuracy["accuracy"], accuracy["accuracy_a"], len(test_a), accuracy["accuracy_b"],
                 len(test_b), held_out)
    return net, meta


def obtain_classifier(config: EvalConfig, device: torch.device) -> tuple[DomainClassifier, dict[str, Any]]:
    """The --domain-classifier file, or one trained now (and saved there when a URL was given)."""
    url = config.domain_classifier
    if url and storage.exists(url):
        net, meta = load_domain_classifier(url)
    elif config.train_a:
        net, meta = train_classifier(config, device)
        if url:
            storage.write_bytes_atomic(url, to_bytes(export_classifier(net.cpu(), **meta)))
            log.info("domain classifier saved to %s", url)
    else:
        where = f"{url} does not exist" if url else "none given"
        raise UnavailableError(f"no domain classifier ({where}): pass --domain-classifier with a trained "
                               f"one, or --train-a and --train-b to train one")
    if warning := classifier_warning(meta):
        log.warning("%s", warning)
    return net.to(device), {"url": url, **meta}


def save_classifier_only(config: EvalConfig) -> int:
    """--train-classifier-only: train, save to --domain-classifier (replacing a file there), report."""
    net, meta = train_classifier(config, pick_device(config.device))
    storage.write_bytes_atomic(config.domain_classifier, to_bytes(export_classifier(net.cpu(), **meta)))
    print(classifier_note(meta))
    print(f"saved to {config.domain_classifier}")
    if warning := classifier_warning(meta):
        log.warning("%s", warning)
    return 0


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class Sample:
    """One pair shown in the report."""

    key: str
    input: torch.Tensor | None
    output: torch.Tensor


@dataclass
class Scored:
    """What an evaluation pass leaves: the keys of the scored images, in meter order, samples, and the
    manifest rows left out."""

    keys: list[str]
    samples: list[Sample]
    rejected: list[Rejection] = field(default_factory=list)


def _update(meters: tuple[QualityMeter, QualityMeter | None], x: torch.Tensor, y: torch.Tensor) -> None:
    translated, baseline = meters
    translated.update(y, inputs=x)
    if baseline is not None:
        baseline.update(x, inputs=x)  # the identity translation: content 1, the inputs' domain


def translate_checkpoint(config: EvalConfig, meters: tuple[QualityMeter, QualityMeter | None],
                         device: torch.device) -> Scored:
    """Translate --test-a with the generator; score outputs (and inputs); keep the first samples."""
    url = resolve_generator_url(config.checkpoint)
    netG = generator_from_checkpoint(read_checkpoint(storage.read_bytes(url), url), url).to(device)
    scored = Scored([], [])
    inputs = decode_for_eval(iter_encoded(config.test_a), config.crop_size, netG.input_nc)
    for items, x in batched(inputs, config.batch_size):
        x = x.to(device)
        with torch.inference_mode():
            y = quantize(netG(x))
        _update(meters, x, y)
        scored.keys += [item.key for item in items]
        room = config.samples - len(scored.samples)
        scored.samples += [Sample(item.key, xi.cpu(), yi.cpu())
                           for item, xi, yi in zip(items[:room], as_rgb(x), as_rgb(y), strict=False)]
    return scored


def score_translated(config: EvalConfig, meters: tuple[QualityMeter, QualityMeter | None],
                     device: torch.device) -> Scored:
    """Score an inference output's images against their inputs, a chunk of manifest rows at a time.
    Only screened rows are read (outputs under --translated with matching hashes, inputs under
    --inputs); a row that fails, or whose input or output cannot be read, is left out and named."""
    listed = translated_pairs(config.translated)
    if not listed:
        raise FileNotFoundError(f"{config.translated}: the manifest has no successful rows")
    pairs, rejected = screen_pairs(listed, Confinement([config.translated]),
                                   Confinement(config.inputs or [config.test_a]))
    scored = Scored([], [], rejected)
    for start in range(0, len(pairs), PAIR_CHUNK):
        chunk = pairs[start:start + PAIR_CHUNK]
        outputs = {item.key: y for item, y in decode_for_eval(
            read_outputs(chunk, scored.rejected), config.crop_size)}
        inputs = {item.key: x for item, x in decode_for_eval(
            read_urls((p.key, p.source_url) for p in chunk if p.key in outputs), config.crop_size)}
        keys = [p.key for p in chunk if p.key in outputs and p.key in inputs]
        failed = {r.key for r in scored.rejected}
        scored.rejected += [unreadable(p, p.key in outputs) for p in chunk
                            if p.key not in inputs and p.key not in failed]
        for i in range(0, len(keys), config.batch_size):
            batch = keys[i:i + config.batch_size]
            x = torch.stack([inputs[k] for k in batch]).to(device)
            y = torch.stack([outputs[k] for k in batch]).to(device)
            _update(meters, x, y)
        scored.keys += keys
        room = config.samples - len(scored.samples)
        scored.samples += [Sample(k, inputs[k], outputs[k]) for k in keys[:room]]
    if not scored.keys:
        raise NothingToScoreError(
            f"{config.translated}: none of the {len(listed)} successful manifest rows can be scored "
            f"({rejection_summary(r.reason for r in scored.rejected)}; each is named above)")
    return scored


def unreadable(pair: TranslatedPair, output_read: bool) -> Rejection:
    """The rejection of a screened row whose output, or else input, could not be read or decoded."""
    url = pair.source_url if output_read else pair.output_url
    what = "input" if output_read else "output"
    return Rejection(pair.key, "unreadable", url, f"the {what} {url} could not be read or decoded")


def rejection_summary(reasons: Iterable[str]) -> str:
    """'2 output-outside, 1 sha256-mismatch': how many rows were left out, by reason code."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(Counter(reasons).items()))


def reference_pass(config: EvalConfig, inception: FIDInception | None, classifier: DomainClassifier | None,
                   device: torch.device) -> tuple[FeatureStats | None, QualityMeter | None]:
    """Reference statistics of real B (loaded from --reference-stats, or computed and saved there), and a
    meter with the classifier's verdicts on real B (when --test-b is given)."""
    stats = None
    if inception is not None and config.reference_stats and storage.exists(config.reference_stats):
        stats = FeatureStats.from_bytes(storage.read_bytes(config.reference_stats), config.reference_stats)
        log.info("reference statistics of %d images from %s", stats.count, config.reference_stats)
    if not config.test_b:
        return stats, None
    meter = QualityMeter(inception if stats is None else None, classifier)
    if meter.inception is None and classifier is None:
        return stats, None
    for x in image_batches(config.test_b, config.crop_size, config.batch_size):
        meter.update(x.to(device))
    if meter.inception is not None:
        stats = meter.stats()
        if config.reference_stats:
            storage.write_bytes_atomic(config.reference_stats, stats.to_bytes())
            log.info("reference statistics saved to %s", config.reference_stats)
    return stats, meter


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _missing_reason(count: int, reference: FeatureStats | None) -> str:
    if count < 2:
        return f"needs at least 2 translated images, got {count}"
    if reference is None:
        return "no reference statistics of real B (--test-b, or an existing --reference-stats file)"
    return "the reference statistics hold no features (a pytorch-fid .npz has only mu and sigma)"


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run the evaluation and write the report; returns the metrics (as written to metrics.json)."""
    device = pick_device(config.device)
    required = set(config.metrics or ())
    wanted = required or set(METRICS)
    errors: dict[str, str] = {}
    inception = classifier = None
    classifier_meta: dict[str, Any] = {}
    if wanted & {"fid", "kid"}:
        try:
            inception = load_inception(config.inception_weights, config.download).to(device)
        except InceptionWeightsError as exc:
            if required & {"fid", "kid"}:
                raise
            errors["fid"] = errors["kid"] = str(exc)
            log.warning("FID and KID unavailable: %s", exc)
    if "domain" in wanted:
        try:
            classifier, classifier_meta = obtain_classifier(config, device)
        except UnavailableError as exc:
            if "domain" in required:
                raise
            errors["domain"] = str(exc)
            log.warning("domain score unavailable: %s", exc)
    reference, real_b = reference_pass(config, inception, classifier, device)
    translated = QualityMeter(inception, classifier)
    baseline = QualityMeter(inception, classifier) if config.baseline else None
    run = translate_checkpoint if config.checkpoint else score_translated
    scored = run(config, (translated, baseline), device)
    kid = {"kid_subsets": config.kid_subsets, "kid_subset_size": config.kid_subset_size, "seed": config.seed}
    scores = translated.scores(reference, **kid)
    for name, key in (("fid", "fid"), ("kid", "kid"), ("domain", "domain_score")):
        if name in wanted and key not in scores and name not in errors:
            errors[name] = _missing_reason(translated.count, reference)
    missing = sorted(required & set(errors))
    if missing:
        raise UnavailableError("; ".join(f"{name}: {errors[name]}" for name in missing))
    identity = baseline.scores(reference, **kid) if baseline is not None else None
    real_b_scores = real_b.scores(None) if real_b is not None else None
    no_better = _no_better_than_identity(scores, identity)
    if no_better:
        log.warning("%s", no_better)
    if scored.rejected:
        log.warning("%d manifest rows rejected, not scored: %s", len(scored.rejected),
                    rejection_summary(r.reason for r in scored.rejected))
    doubt = classifier_warning(classifier_meta) if classifier is not None else ""  # logged when loaded
    warnings = [w for w in (doubt, no_better) if w]
    metrics: dict[str, Any] = {
        **headline(scores, identity, real_b_scores, classifier_meta),
        "translated": scores,
        "baseline": identity,
        "real_b": real_b_scores,
        "unavailable": errors,
        "warnings": warnings,
        "rejected": len(scored.rejected),
        "rejections": {r.key: {"reason": r.reason, "url": r.url, "detail": r.detail}
                       for r in scored.rejected},
        "domain_classifier": classifier_meta or None,
        "inception_weights": inception_weights_source(config.inception_weights) if inception else None,
        "config": asdict(config),
    }
    per_image = translated.per_image()
    identity_per_image = baseline.per_image() if baseline is not None else {}
    write_per_image(config.out, scored.keys, per_image, identity_per_image)
    write_report(config.out, metrics, scored.samples, per_image)
    return metrics


HEADLINE = ("translation_score", "content_score", "domain_score", "fid", "kid")


def headline(scores: dict[str, float], identity: dict[str, float] | None,
             real_b: dict[str, float] | None, classifier_meta: dict[str, Any]) -> dict[str, float]:
    """The numbers a reader looks for first, flat: the outputs' scores, the identity baseline's
    (``identity_*``: the inputs returned unchanged), real B's domain score, the classifier's accuracy."""
    out = {name: scores[name] for name in HEADLINE if name in scores}
    if identity is not None:
        out.update({f"identity_{name}": identity[name] for name in HEADLINE if name in identity})
    if real_b is not None and "domain_score" in real_b:
        out["real_b_domain_score"] = real_b["domain_score"]
    if classifier_meta.get("test_accuracy") is not None:
        out["classifier_accuracy"] = classifier_meta["test_accuracy"]
    return out


def _no_better_than_identity(scores: dict[str, float], identity: dict[str, float] | None) -> str:
    if identity is None or "translation_score" not in scores:
        return ""
    if scores["translation_score"] > identity["translation_score"]:
        return ""
    return (f"the translation score {scores['translation_score']:.3f} is no better than the identity's "
            f"{identity['translation_score']:.3f} (the inputs returned unchanged)")


def write_per_image(out: str, keys: list[str], per_image: dict[str, list[float]],
                    identity: dict[str, list[float]]) -> None:
    """OUT/per_image.parquet: one row per scored image, its key and scores (identity_* for its input)."""
    columns: dict[str, list[Any]] = {"key": keys, **per_image}
    if "domain_probability" in identity:
        columns["identity_domain_probability"] = identity["domain_probability"]
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, compression="zstd")
    storage.write_bytes_atomic(storage.join(out, "per_image.parquet"), buffer.getvalue())


# ----------------------------------------------------------------------------------------- report
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_eval_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(0, args.log_format)
    reuse_freed_memory()  # generator and encoder forwards allocate their activations anew each time
    try:
        if config.train_classifier_only:
            return save_classifier_only(config)
        metrics = evaluate(config)
    except (NothingToScoreError, CheckpointError) as exc:  # bad input: exit 2, as in every job
        log.error("%s", exc)
        return 2
    except (InceptionWeightsError, UnavailableError, ConfigError, FileNotFoundError,
            ShardIndexError, ListingError) as exc:
        log.error("%s", exc)
        return 1
    print(format_table(metrics))
    print(f"report: {storage.join(config.out, 'report.html')}")
    return 0


if __name__ == "__main__":
    run_job(main)
