"""One typed config system for every job: dataclass sections, a YAML file and ``key.sub=value`` overrides.

Every key is validated on load: an unknown key or a value of the wrong type is a ``ConfigError`` that
names the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from cut import CUTConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ------------------------------------------------------------------------------------------ schema
@dataclass
class ModelSection:
    """The CUT model; ``None`` means "the preset's value" (cut-reference.md section 6)."""

    preset: str = "CUT"
    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    n_layers_D: int = 3
    antialias: bool = True
    antialias_up: bool = True
    netF_nc: int = 256
    num_patches: int = 256
    nce_layers: list[int] = field(default_factory=lambda: [0, 4, 8, 12, 16])
    nce_T: float = 0.07
    lambda_GAN: float = 1.0
    lambda_NCE: float | None = None
    nce_idt: bool | None = None
    flip_equivariance: bool | None = None
    gan_mode: str = "lsgan"
    channels_last: bool | None = None
    bf16: bool | None = None


@dataclass
class DataSection:
    a: str = ""
    b: str = ""
    load_size: int = 286
    crop_size: int = 256
    workers: int = 4
    flip: bool = True


@dataclass
class TrainSection:
    batch_size: int = 1
    lr: float = 0.0002
    beta1: float = 0.5
    beta2: float = 0.999
    n_epochs: int | None = None
    n_epochs_decay: int | None = None
    max_steps: int | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    image_every: int = 500
    device: str = "auto"
    start_fresh_if_unreadable: bool = False  # every checkpoint unreadable: start at step 0, not stop


@dataclass
class EvalSection:
    """Periodic evaluation on held-out images (rank 0); the best checkpoint is kept beside the latest."""

    every: int = 0  # steps between evaluations; 0 turns it off
    a: str = ""  # held-out domain-A images: a shard set, folder, prefix, glob or URL list
    b: str = ""  # held-out real B images: the FID/KID reference (optional)
    domain_classifier: str = ""  # a classifier saved by jobs.eval (for domain_score)
    inception_weights: str = ""  # FID Inception weights; empty: the torch hub cache
    metric: str = "domain_score"  # picks the best checkpoint: domain_score (higher) | fid | kid (lower)
    max_images: int = 200
    batch_size: int = 16


@dataclass
class RunSection:
    url: str = ""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)


EPOCH_PRESETS = {"CUT": (200, 200), "FastCUT": (150, 50)}


# ------------------------------------------------------------------------------------------ loading
def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _yaml11_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def build(cls: type[T], data: Any, source: str, where: str = "") -> T:
    """An instance of the dataclass ``cls`` from plain data, every key and type checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{source}: unknown config key '{key}' (known here: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = build(annotation, value, source, key)
            continue
        if isinstance(value, str) and _type_ok(0.5, annotation) and not _type_ok(value, annotation):
            value = _yaml11_float(value)  # PyYAML reads 1e-4 (no dot) as a string
        if not _type_ok(value, annotation):
            expected = getattr(annotation, "__name__", str(annotation))
            raise ConfigError(f"{source}: config key '{key}' must be {expected}, got {value!r}")
        takes_int = annotation is int or int in typing.get_args(annotation)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        values[name] = float(value) if is_int and not takes_int else value
    return cls(**values)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=1e-4`` -> ``{"train": {"lr": 1e-4}}``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    cls: type[T], path: str | None = None, overrides: Sequence[str] = (), text: str | None = None
) -> T:
    """Build ``cls`` from a YAML file (or ``text``) plus overrides, validating every key."""
    source = path or "config"
    data: Any = {}
    if text is None and path is not None:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    if text:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections (model:, data:, "
                              f"train:, ...), got {type(data).__name__}")
    for item in overrides:
        data = _merge(data, parse_override(item))
    return build(cls, data, source)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------- training
def resolve_train_config(config: TrainConfig) -> TrainConfig:
    """Fill preset-dependent values (epochs, NCE options) and check cross-key rules."""
    m, t, d, e = config.model, config.train, config.data, config.eval
    if m.preset not in EPOCH_PRESETS:
        raise ConfigError(
            f"config key 'model.preset' must be one of {sorted(EPOCH_PRESETS)}, got {m.preset!r}"
        )
    n_epochs, n_decay = EPOCH_PRESETS[m.preset]
    t = dataclasses.replace(
        t,
        n_epochs=n_epochs if t.n_epochs is None else t.n_epochs,
        n_epochs_decay=n_decay if t.n_epochs_decay is None else t.n_epochs_decay,
    )
    checks = [
        ("data.a", bool(d.a), "a shard set URL for domain A"),
        ("data.b", bool(d.b), "a shard set URL for domain B"),
        ("run.url", bool(config.run.url), "the run URL for checkpoints and logs"),
        ("data.crop_size", d.crop_size >= 32 and d.crop_size % 4 == 0, "a multiple of 4, at least 32"),
        ("data.load_size", d.load_size >= d.crop_size, "at least data.crop_size"),
        ("data.workers", d.workers >= 0, ">= 0"),
        ("train.batch_size", t.batch_size >= 1, ">= 1"),
        ("train.lr", t.lr > 0, "> 0"),
        ("train.beta1", 0 <= t.beta1 < 1, "in [0, 1) (Adam's first-moment decay)"),
        ("train.beta2", 0 <= t.beta2 < 1, "in [0, 1) (Adam's second-moment decay)"),
        ("train.n_epochs", t.n_epochs >= 0, ">= 0"),
        ("train.n_epochs_decay", t.n_epochs_decay >= 0, ">= 0"),
        ("train.n_epochs", t.n_epochs + t.n_epochs_decay >= 1, "such that n_epochs + n_epochs_decay >= 1"),
        ("train.max_steps", t.max_steps is None or t.max_steps >= 1, ">= 1 or null"),
        ("train.checkpoint_every", t.checkpoint_every >= 1, ">= 1"),
        ("train.keep_last", t.keep_last >= 1, ">= 1"),
        ("train.log_every", t.log_every >= 1, ">= 1"),
        ("train.image_every", t.image_every >= 1, ">= 1"),
        ("train.device", t.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
        ("eval.every", e.every >= 0, ">= 0"),
        ("eval.a", bool(e.a) or e.every == 0, "a held-out domain-A image source when eval.every > 0"),
        ("eval.metric", e.metric in ("domain_score", "fid", "kid"), "domain_score, fid or kid"),
        (
            "eval.domain_classifier",
            bool(e.domain_classifier) or e.every == 0 or e.metric != "domain_score",
            "a classifier file (python -m jobs.eval --domain-classifier) for eval.metric domain_score",
        ),
        ("eval.b", bool(e.b) or e.every == 0 or e.metric == "domain_score", "real B images for FID/KID"),
        ("eval.max_images", e.max_images >= 2, ">= 2"),
        ("eval.batch_size", e.batch_size >= 1, ">= 1"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {expected}")
    try:
        cut_config(dataclasses.replace(config, train=t), device_type="cpu")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return dataclasses.replace(config, train=t)


def cut_config(config: TrainConfig, device_type: str) -> CUTConfig:
    """The model config of a training config; bf16 and channels_last default to on for CUDA.

    Every model key is a CUTConfig field of the same name; unset (None) ones keep the preset's value.
    """
    m, t = config.model, config.train
    on_cuda = device_type == "cuda"
    fields = {k: v for k, v in dataclasses.asdict(m).items() if v is not None}
    fields.pop("preset")
    fields.update(
        lr=t.lr,
        beta1=t.beta1,
        beta2=t.beta2,
        channels_last=on_cuda if m.channels_last is None else m.channels_last,
        bf16=on_cuda if m.bf16 is None else m.bf16,
    )
    return CUTConfig.from_preset(m.preset, **fields)
