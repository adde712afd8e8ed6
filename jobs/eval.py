"""Translation quality as numbers and pictures: FID, KID, domain, content and translation scores.

    python -m jobs.eval --checkpoint s3://b/runs/h2z/export/generator.pt \\
        --test-a s3://b/h2z/testA --test-b s3://b/h2z/testB --out s3://b/evals/h2z \\
        --domain-classifier s3://b/h2z/domain.pt --train-a s3://b/h2z/trainA --train-b s3://b/h2z/trainB
    python -m jobs.eval --translated s3://b/translated/h2z --test-b s3://b/h2z/testB --out ...
    python -m jobs.eval --train-classifier-only --domain-classifier s3://b/h2z/domain.pt \\
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
(and saved there); the log says which, with its held-out accuracy (on --test-a/--test-b, else on a
tenth of the training images kept aside), also reported beside every domain score, with a warning
below 0.8. The classifier records the content hashes of the B images it trained on: a --test-b that
holds any of them is refused (exit 2), as its "real B" score would be the classifier's memory. An
input flag naming nothing (--translated, --test-a, --test-b, --inputs, --train-a, --train-b) is
refused the same way, before anything is downloaded, trained or written. The content
score (does the output keep its input's layout) needs no weights; the translation score is, per
image, the lower of P(B | output) and the content score: high only for outputs that look like B and
keep their input (docs/quality.md).

Outputs: OUT/metrics.json (each number once: the headline scores at its top level, the rest of each
column under translated/baseline/real_b; pipeline/report.py lists the keys), OUT/per_image.parquet
(scores of each image), OUT/report.html (with a row of real B images, and a note where every output's
P(B) is at least 0.99 and the domain score ranks nothing), OUT/grid.png, OUT/samples/*.png,
OUT/real_b/*.png; a table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cut import CheckpointError, generator_from_checkpoint, read_checkpoint
from cut.checkpoint import to_bytes
from cut.domain import (
    IMAGE_SIZE,
    DomainClassifier,
    domain_accuracy,
    downscale,
    export_classifier,
    held_out_split,
    train_domain_classifier,
)
from cut.inception import (
    WEIGHTS_NAME,
    FIDInception,
    InceptionWeightsError,
)
from cut.metrics import FeatureStats, QualityMeter, as_rgb, quantize
from jobs.cli import HelpFormatter, add_logging_arguments, add_options, given, option, run_job
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
from pipeline.ingest import ListingError, glob_root
from pipeline.report import (
    SATURATED,
    Sample,
    accuracy_text,
    classifier_note,
    format_table,
    metrics_scores,
    rejection_summary,
    write_per_image,
    write_report,
)
from pipeline.shards import ShardIndexError

log = logging.getLogger("jobs.eval")

METRICS = ("fid", "kid", "domain")
HELD_OUT_SHARE = 0.1  # of the training images, kept aside to measure a classifier trained without test sets
PAIR_CHUNK = 256  # inference outputs read (with their inputs) per chunk
FINGERPRINT_HEX = 16  # hex digits of an image's sha256 kept per training image: unique, and short
REAL_B_SHOWN = 8  # real B images shown in the report (at most --samples)


class UnavailableError(RuntimeError):
    """A metric cannot be computed with what this run was given."""


class NothingToScoreError(RuntimeError):
    """Every successful row of a --translated manifest was rejected or unreadable."""


class TrainingImagesError(RuntimeError):
    """--test-b holds images the domain classifier trained on: its "real B" score would be memory."""


@dataclass
class EvalConfig:
    """One evaluation: each field a flag of the command line (its default and help written here only),
    validated by ``jobs.config.build`` and ``load_eval_config``."""

    checkpoint: str = option("", "generator to evaluate: our export, latest_net_G.pth, a training state.pt "
                             "or a run folder", exclusive=True)
    translated: str = option("", "inference output folder (OUT/manifest/*.parquet, OUT/images/...)",
                             exclusive=True)
    inputs: list[str] | None = option(  # noqa: RUF009 (None: no list is shared)
        None, "with --translated: the folders, prefixes or shard sets its inputs may be read from "
        "(jobs.infer's --input); a manifest row whose source_url lies elsewhere is rejected, not read "
        "(default: --test-a)",
        metavar="URL")
    train_classifier_only: bool = option(False, "train a domain classifier on --train-a/--train-b, save it "
                                         "to --domain-classifier and stop (its held-out accuracy is in the "
                                         "file and on stdout)", exclusive=True)
    test_a: str = option("", "real domain A test images: what --checkpoint translates, and the A test set of "
                         "a domain classifier trained here")
    test_b: str = option("", "real domain B images (reference for FID/KID; domain classifier test)")
    out: str = option("", "report folder URL (not used by --train-classifier-only)")
    metrics: list[str] | None = option(  # noqa: RUF009 (None: no list is shared)
        None, "compute these, and fail if one cannot be computed (default: every metric available)",
        choices=METRICS)
    domain_classifier: str = option("", "domain classifier file (trained and saved here if absent and "
                                    "--train-a/--train-b are given)")
    train_a: str = option("", "real domain A training images for the domain classifier")
    train_b: str = option("", "real domain B training images for the domain classifier")
    classifier_epochs: int = option(20, "epochs of the domain classifier")
    classifier_max_images: int = option(5000, "training images per domain")
    inception_weights: str = option("", f"path or URL of {WEIGHTS_NAME} (default: torch hub cache)")
    download: bool = option(
        True, "never try to download the Inception weights (by default: once, when missing)", "--no-download")
    reference_stats: str = option("", "Inception statistics of --test-b (.npz): reused when present, "
                                  "written when computed")
    baseline: bool = option(
        True, "skip scoring the untranslated inputs (scored by default, as the baseline)", "--no-baseline")
    crop_size: int = option(256, "images are resized to this square size")
    batch_size: int = option(16, "images per batch through G and the scorers")
    samples: int = option(8, "input/output pairs shown in the report")
    kid_subsets: int = option(100, "random subsets KID averages over")
    kid_subset_size: int = option(1000, "images per KID subset (at most all)")
    seed: int = option(0, "seeds the classifier and the KID subsets")
    device: str = option("auto", "auto: CUDA if any", choices=("auto", "cpu", "cuda"))
    note: str = option("", "a line of text shown at the top of the report (what was evaluated, why)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.eval", description=__doc__,
                                formatter_class=HelpFormatter)
    add_options(p, EvalConfig)
    add_logging_arguments(p)
    return p


def load_eval_config(args: argparse.Namespace) -> EvalConfig:
    """The validated config of a parsed command line."""
    config = build(EvalConfig, given(args, "log_format"), "command line")
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


def source_exists(url: str) -> bool:
    """Whether an image source names something: its folder for a glob, else the URL itself."""
    return storage.exists(glob_root(url) if storage.has_glob(url) else url)


def missing_inputs(config: EvalConfig) -> list[str]:
    """'--flag URL does not exist' for each input this run would read that is not there (checked before
    anything is downloaded, trained or written)."""
    named = [("--translated", config.translated), ("--test-a", config.test_a), ("--test-b", config.test_b),
             *(("--inputs", url) for url in config.inputs or ())]
    saved = bool(config.domain_classifier) and storage.exists(config.domain_classifier)
    if config.train_classifier_only or not saved:
        named += [("--train-a", config.train_a), ("--train-b", config.train_b)]
    return [f"{flag} {url} does not exist" for flag, url in named if url and not source_exists(url)]


def fingerprint(data: bytes) -> str:
    """A short content hash of an encoded image: the same file in a folder, a list or a shard set."""
    return hashlib.sha256(data).hexdigest()[:FINGERPRINT_HEX]


def load_images(url: str, crop_size: int, size: int,
                limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Up to ``limit`` images of a source, test-preprocessed at ``crop_size`` then downscaled to ``size``,
    and their fingerprints."""
    batches, prints = [], []
    for items, x in batched(decode_for_eval(iter_encoded(url), crop_size), 64):
        batches.append(downscale(x, size))
        prints += [fingerprint(item.data) for item in items if item.data is not None]
    if not batches:
        raise FileNotFoundError(f"no readable images in {url}")
    return torch.cat(batches)[:limit], prints[:limit]


def refuse_training_images(test_b: str, meta: dict[str, Any], where: str) -> None:
    """Raise TrainingImagesError when --test-b holds images the classifier trained on: by the content
    hashes it records (``train_b_sha256``), or, for a classifier saved without them, by its --train-b URL."""
    if not test_b:
        return
    trained = meta.get("train_b_sha256")
    if trained is None:
        if str(meta.get("train_b", "")).rstrip("/") != test_b.rstrip("/"):
            return
        overlap, count = "all", "its"
    else:
        known = set(trained)
        prints = [fingerprint(item.data) for item in iter_encoded(test_b) if item.data is not None]
        shared = sum(p in known for p in prints)
        if not shared:
            return
        overlap, count = str(shared), f"the {len(prints)}"
    raise TrainingImagesError(
        f"--test-b {test_b}: {overlap} of {count} images are images the domain classifier {where} trained "
        f"on, so its real B domain score would measure what it memorised, not domain B. Pass real B images "
        f"it never saw as --test-b (a test set such as testB), or train the classifier without them")


def train_classifier(config: EvalConfig, device: torch.device) -> tuple[DomainClassifier, dict[str, Any]]:
    """Train a domain classifier on --train-a/--train-b; metadata holds its held-out accuracy, on the
    real test sets when given, else on a tenth of the training images kept out of its training."""
    start = time.perf_counter()
    limit = config.classifier_max_images
    train_a, _ = load_images(config.train_a, config.crop_size, IMAGE_SIZE, limit)
    train_b, prints_b = load_images(config.train_b, config.crop_size, IMAGE_SIZE, limit)
    if config.test_a and config.test_b:
        held_out = "test images (--test-a, --test-b)"
        test_a, _ = load_images(config.test_a, config.crop_size, IMAGE_SIZE)
        test_b, _ = load_images(config.test_b, config.crop_size, IMAGE_SIZE)
    elif min(len(train_a), len(train_b)) >= 2:
        held_out = f"{HELD_OUT_SHARE:.0%} of the training images, kept out of training"
        train_a, test_a = held_out_split(train_a, HELD_OUT_SHARE, config.seed)
        kept, held = held_out_split(torch.arange(len(train_b)), HELD_OUT_SHARE, config.seed + 1)
        train_b, test_b = train_b[kept], train_b[held]  # split once, by index: the prints follow it
        prints_b = [prints_b[i] for i in kept.tolist()]
    else:
        held_out, test_a, test_b = "", None, None
    meta: dict[str, Any] = {"train_a": config.train_a, "train_b": config.train_b,
                            "train_images_a": len(train_a), "train_images_b": len(train_b),
                            "train_b_sha256": prints_b,
                            "image_size": IMAGE_SIZE, "crop_size": config.crop_size,
                            "epochs": config.classifier_epochs}
    refuse_training_images(config.test_b, meta, "would be")  # before it is trained, or anything written
    log.info("domain classifier: training on %d A and %d B images", len(train_a), len(train_b))
    losses: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:
        losses.append(loss)
        log.debug("domain classifier epoch %d: loss %.4f", epoch + 1, loss)

    net = train_domain_classifier(train_a, train_b, epochs=config.classifier_epochs, seed=config.seed,
                                  device=device, on_epoch=on_epoch)
    meta["train_seconds"] = round(time.perf_counter() - start, 1)
    log.info("domain classifier: %d epochs in %.1f s, loss %.4f at the first, %.4f at the last",
             len(losses), meta["train_seconds"], losses[0], losses[-1])
    if test_a is not None and test_b is not None:
        accuracy = domain_accuracy(net.to(device), test_a.to(device), test_b.to(device))
        meta.update({f"test_{k}": v for k, v in accuracy.items()}, test_images_a=len(test_a),
                    test_images_b=len(test_b), held_out=held_out)
    return net, meta


def obtain_classifier(config: EvalConfig, device: torch.device) -> tuple[DomainClassifier, dict[str, Any]]:
    """The --domain-classifier file, or one trained now (and saved there when a URL was given)."""
    url = config.domain_classifier
    if url and storage.exists(url):
        net, meta = load_domain_classifier(url)
        refuse_training_images(config.test_b, meta, f"{url} was")
        log.info("domain classifier %s reused: %s", url, accuracy_text(meta))
    elif config.train_a:
        net, meta = train_classifier(config, device)
        if url:
            storage.write_bytes_atomic(url, to_bytes(export_classifier(net.cpu(), **meta)))
        log.info("domain classifier %s: %s", f"{url} trained and saved" if url else "trained (not saved: no "
                 "--domain-classifier)", accuracy_text(meta))
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
    print(classifier_note(meta))  # the trained-and-saved line, on stdout
    print(f"saved to {config.domain_classifier}")
    if warning := classifier_warning(meta):
        log.warning("%s", warning)
    return 0


# ------------------------------------------------------------------------------------- evaluation
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


def reference_pass(
    config: EvalConfig, inception: FIDInception | None, classifier: DomainClassifier | None,
    device: torch.device,
) -> tuple[FeatureStats | None, QualityMeter | None, list[torch.Tensor]]:
    """Reference statistics of real B (loaded from --reference-stats, or computed and saved there), a
    meter with the classifier's verdicts on real B, and the first real B images, to show (when
    --test-b is given)."""
    stats, shown = None, []
    if inception is not None and config.reference_stats and storage.exists(config.reference_stats):
        stats = FeatureStats.from_bytes(storage.read_bytes(config.reference_stats), config.reference_stats)
        log.info("reference statistics of %d images from %s", stats.count, config.reference_stats)
    if not config.test_b:
        return stats, None, shown
    meter = QualityMeter(inception if stats is None else None, classifier)
    room = min(config.samples, REAL_B_SHOWN)
    if meter.inception is None and classifier is None:
        first = next(image_batches(config.test_b, config.crop_size, room), None) if room else None
        return stats, None, [] if first is None else list(as_rgb(first))
    for x in image_batches(config.test_b, config.crop_size, config.batch_size):
        shown += list(as_rgb(x.cpu()))[:room - len(shown)]
        meter.update(x.to(device))
    if meter.inception is not None:
        stats = meter.stats()
        if config.reference_stats:
            storage.write_bytes_atomic(config.reference_stats, stats.to_bytes())
            log.info("reference statistics saved to %s", config.reference_stats)
    return stats, meter, shown


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
    if "domain" in wanted:  # first: it may refuse --test-b, before anything is downloaded or written
        try:
            classifier, classifier_meta = obtain_classifier(config, device)
        except UnavailableError as exc:
            if "domain" in required:
                raise
            errors["domain"] = str(exc)
            log.warning("domain score unavailable: %s", exc)
    if wanted & {"fid", "kid"}:
        try:
            inception = load_inception(config.inception_weights, config.download).to(device)
        except InceptionWeightsError as exc:
            if required & {"fid", "kid"}:
                raise
            errors["fid"] = errors["kid"] = str(exc)
            log.warning("FID and KID unavailable: %s", exc)
    reference, real_b, real_b_shown = reference_pass(config, inception, classifier, device)
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
    per_image = translated.per_image()
    probabilities = per_image.get("domain_probability")
    metrics: dict[str, Any] = {
        **metrics_scores(scores, identity, real_b_scores, classifier_meta),
        "unavailable": errors,
        "warnings": warnings,
        "rejected": len(scored.rejected),
        "rejections": {r.key: {"reason": r.reason, "url": r.url, "detail": r.detail}
                       for r in scored.rejected},
        "inception_weights": inception_weights_source(config.inception_weights) if inception else None,
        "config": asdict(config),
    }
    if probabilities:
        metrics["domain_saturated"] = min(probabilities) >= SATURATED
    identity_per_image = baseline.per_image() if baseline is not None else {}
    write_per_image(config.out, scored.keys, per_image, identity_per_image)
    write_report(config.out, metrics, scored.samples, per_image, real_b_shown)
    return metrics


def _no_better_than_identity(scores: dict[str, float], identity: dict[str, float] | None) -> str:
    if identity is None or "translation_score" not in scores:
        return ""
    if scores["translation_score"] > identity["translation_score"]:
        return ""
    return (f"the translation score {scores['translation_score']:.3f} is no better than the identity's "
            f"{identity['translation_score']:.3f} (the inputs returned unchanged)")


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
        if missing := missing_inputs(config):  # before any download, training or writing
            log.error("%s", "; ".join(missing))
            return 2
        if config.train_classifier_only:
            return save_classifier_only(config)
        metrics = evaluate(config)
    except (NothingToScoreError, CheckpointError, TrainingImagesError) as exc:  # bad input: exit 2
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
