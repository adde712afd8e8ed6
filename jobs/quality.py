"""Quality networks on storage, shared by jobs.eval and jobs.train's periodic evaluation.

The FID Inception weights come from a path or URL (given, else the CUT_INCEPTION_WEIGHTS
environment variable), else the torch hub cache (downloaded there when allowed); their absence is
an InceptionWeightsError that says which file to put where (docs/quality.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch

from cut import read_checkpoint
from cut.domain import DomainClassifier, classifier_from_export
from cut.inception import (
    WEIGHTS_NAME,
    WEIGHTS_SHA256_PREFIX,
    WEIGHTS_URL,
    FIDInception,
    InceptionWeightsError,
    fid_inception,
)
from cut.metrics import FeatureStats, QualityMeter, evaluate_generator
from jobs.config import EvalSection
from pipeline import storage
from pipeline.images import image_batches

log = logging.getLogger(__name__)

WEIGHTS_ENV = "CUT_INCEPTION_WEIGHTS"  # path or URL of pre-staged Inception weights


def hub_weights_path() -> str:
    """Where pytorch-fid (and this job) keep the Inception weights: the torch hub checkpoint cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)


def _weights_missing(reason: str) -> InceptionWeightsError:
    return InceptionWeightsError(
        f"FID and KID need the Inception weights file {WEIGHTS_NAME} (pytorch-fid's port of TensorFlow's "
        f"FID Inception). {reason}. Download it from {WEIGHTS_URL} on a machine with network access and "
        f"put it at {hub_weights_path()} (the torch hub cache; TORCH_HOME moves it), or set "
        f"{WEIGHTS_ENV}=PATH (or pass --inception-weights PATH)."
    )


def inception_weights_source(weights: str = "") -> str:
    """Where the Inception weights are read from: ``weights``, else $CUT_INCEPTION_WEIGHTS, else the
    torch hub cache."""
    return weights or os.environ.get(WEIGHTS_ENV, "") or hub_weights_path()


def load_inception(weights: str = "", download: bool = True) -> FIDInception:
    """The FID Inception network from ``weights`` (a path or URL), else $CUT_INCEPTION_WEIGHTS, else
    the torch hub cache, downloading the file there first when allowed. InceptionWeightsError says
    what to do if absent."""
    given = "--inception-weights" if weights else WEIGHTS_ENV
    weights = weights or os.environ.get(WEIGHTS_ENV, "")
    if weights:
        if not storage.exists(weights):
            raise _weights_missing(f"{given} {weights} does not exist")
        source, data = weights, storage.read_bytes(weights)
    else:
        source = hub_weights_path()
        if not os.path.exists(source):
            if not download:
                raise _weights_missing(f"It is not at {source} and downloading is off")
            try:
                os.makedirs(os.path.dirname(source), exist_ok=True)
                torch.hub.download_url_to_file(
                    WEIGHTS_URL, source, hash_prefix=WEIGHTS_SHA256_PREFIX, progress=False
                )
            except Exception as exc:  # no network, proxy, TLS, hash mismatch: all mean "not available"
                raise _weights_missing(
                    f"It is not at {source} and could not be downloaded ({type(exc).__name__}: {exc})"
                ) from exc
        with open(source, "rb") as f:
            data = f.read()
    if not hashlib.sha256(data).hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
        log.warning(
            "%s is not the published %s (sha256 differs); FID values may not be comparable",
            source,
            WEIGHTS_NAME,
        )
    return fid_inception(read_checkpoint(data, source), source)


def load_domain_classifier(url: str) -> tuple[DomainClassifier, dict[str, Any]]:
    """A saved domain classifier and its metadata (loaded with weights_only)."""
    return classifier_from_export(read_checkpoint(storage.read_bytes(url), url), url)


MIN_CLASSIFIER_ACCURACY = 0.8  # below this, a domain or translation score says little


def classifier_warning(meta: dict[str, Any]) -> str:
    """Why a domain classifier's verdicts deserve doubt ("" when its held-out accuracy is fine)."""
    accuracy = meta.get("test_accuracy")
    if accuracy is None:
        return ("the domain classifier's held-out accuracy is unknown (it was saved without test images): "
                "domain and translation scores may mean little")
    if accuracy < MIN_CLASSIFIER_ACCURACY:
        return (f"the domain classifier's held-out accuracy is {accuracy:.3f}, below "
                f"{MIN_CLASSIFIER_ACCURACY}: domain and translation scores say little; train it longer or "
                f"on more images (python -m jobs.eval --train-classifier-only)")
    return ""


class HeldOutEvaluator:
    """Scores a generator on held-out domain-A images; remembers the best score of the chosen metric.

    Images, classifier, Inception and the real-B reference statistics are loaded once. FID and KID
    need ``b`` and the Inception weights. ``auto`` resolves to ``fid`` when both are there, else to
    ``translation_score`` (which needs the domain classifier). Every result carries the classifier's
    held-out accuracy and, with ``b``, its score on real B, so a domain score is never read alone.
    """

    LOWER_IS_BETTER = ("fid", "kid")

    def __init__(self, config: EvalSection, crop_size: int, device: torch.device, channels: int = 3) -> None:
        self.config = config
        self.batches = _limited_batches(config.a, crop_size, config.batch_size, config.max_images, channels)
        self.classifier = None
        self.context: dict[str, float] = {}
        if config.domain_classifier:
            self.classifier, meta = load_domain_classifier(config.domain_classifier)
            self.classifier = self.classifier.to(device)
            if meta.get("test_accuracy") is not None:
                self.context["classifier_accuracy"] = float(meta["test_accuracy"])
            if warning := classifier_warning(meta):
                log.warning("%s: %s", config.domain_classifier, warning)
        self.inception: FIDInception | None = None
        self.reference: FeatureStats | None = None
        fid_wanted = config.metric in ("auto", *self.LOWER_IS_BETTER)
        if config.b and (fid_wanted or self.classifier is None):
            try:
                self.inception = load_inception(config.inception_weights).to(device)
            except InceptionWeightsError as exc:
                if config.metric in self.LOWER_IS_BETTER:
                    raise
                log.warning("periodic evaluation without FID/KID: %s", exc)
        self.metric = self._resolve(config.metric)
        if config.b and (self.inception is not None or self.classifier is not None):
            real_b = _limited_batches(config.b, crop_size, config.batch_size, config.max_images)
            meter = QualityMeter(self.inception, self.classifier)
            for x in real_b:
                meter.update(x.to(device))
            if self.inception is not None:
                self.reference = meter.stats()
            if self.classifier is not None:
                self.context["real_b_domain_score"] = meter.domain_score()
        log.info("periodic evaluation picks checkpoints/best by %s%s", self.metric,
                 "".join(f", {k}={v:.3f}" for k, v in self.context.items()))
        self.best: float | None = None

    def _resolve(self, metric: str) -> str:
        if metric != "auto":
            return metric
        if self.inception is not None:
            return "fid"
        if self.classifier is None:
            raise InceptionWeightsError(
                "eval.metric auto: FID is unavailable (see the warning above) and there is no "
                "eval.domain_classifier for translation_score; give one of them")
        return "translation_score"

    def __call__(self, netG: torch.nn.Module) -> dict[str, float]:
        count = sum(len(b) for b in self.batches)
        scores = evaluate_generator(
            netG,
            self.batches,
            self.classifier,
            self.inception,
            self.reference,
            kid_subset_size=min(1000, count),
        )
        return {**scores, **self.context}

    def improves(self, scores: dict[str, float]) -> bool:
        """Whether ``scores`` beat the best so far on the chosen metric (and become the best)."""
        value = scores.get(self.metric)
        if value is None:
            return False
        lower = self.metric in self.LOWER_IS_BETTER
        if self.best is None or (value < self.best if lower else value > self.best):
            self.best = value
            return True
        return False


def _limited_batches(url: str, crop_size: int, batch_size: int, limit: int,
                     channels: int = 3) -> list[torch.Tensor]:
    batches, count = [], 0
    for batch in image_batches(url, crop_size, batch_size, channels):
        batches.append(batch[: limit - count])
        count += len(batches[-1])
        if count >= limit:
            break
    if not batches:
        raise FileNotFoundError(f"no readable images for evaluation in {url}")
    return batches
