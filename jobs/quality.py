"""Quality networks on storage, shared by jobs.eval and jobs.train's periodic evaluation.

The FID Inception weights come from a path or URL, else the torch hub cache (downloaded there when
allowed); their absence is an InceptionWeightsError that says which file to put where.
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
from pipeline import storage

log = logging.getLogger(__name__)


def hub_weights_path() -> str:
    """Where pytorch-fid (and this job) keep the Inception weights: the torch hub checkpoint cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)


def _weights_missing(reason: str) -> InceptionWeightsError:
    return InceptionWeightsError(
        f"FID and KID need the Inception weights file {WEIGHTS_NAME} (pytorch-fid's port of TensorFlow's "
        f"FID Inception). {reason}. Download it from {WEIGHTS_URL} on a machine with network access and "
        f"put it at {hub_weights_path()} (the torch hub cache; TORCH_HOME moves it), or pass "
        f"--inception-weights PATH.")


def load_inception(weights: str = "", download: bool = True) -> FIDInception:
    """The FID Inception network from ``weights`` (a path or URL), else from the torch hub cache,
    downloading the file there first when allowed. InceptionWeightsError says what to do if absent."""
    if weights:
        if not storage.exists(weights):
            raise _weights_missing(f"--inception-weights {weights} does not exist")
        source, data = weights, storage.read_bytes(weights)
    else:
        source = hub_weights_path()
        if not os.path.exists(source):
            if not download:
                raise _weights_missing(f"It is not at {source} and downloading is off")
            try:
                os.makedirs(os.path.dirname(source), exist_ok=True)
                torch.hub.download_url_to_file(WEIGHTS_URL, source, hash_prefix=WEIGHTS_SHA256_PREFIX,
                                               progress=False)
            except Exception as exc:  # no network, proxy, TLS, hash mismatch: all mean "not available"
                raise _weights_missing(f"It is not at {source} and could not be downloaded "
                                       f"({type(exc).__name__}: {exc})") from exc
        with open(source, "rb") as f:
            data = f.read()
    if not hashlib.sha256(data).hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
        log.warning("%s is not the published %s (sha256 differs); FID values may not be comparable",
                    source, WEIGHTS_NAME)
    return fid_inception(read_checkpoint(data, source), source)


def load_domain_classifier(url: str) -> tuple[DomainClassifier, dict[str, Any]]:
    """A saved domain classifier and its metadata (loaded with weights_only)."""
    return classifier_from_export(read_checkpoint(storage.read_bytes(url), url), url)
