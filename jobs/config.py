"""One typed config system for every job: dataclass sections, a YAML file and ``key.sub=value`` overrides.

Every key is validated on load: an unknown key or a value of the wrong type is a ``ConfigError`` that
names the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from cut import PRESETS, CUTConfig
from cut.schedule import LR_POLICIES
from cut.sincut import SinCUTConfig
from cut.stylegan2 import GENERATOR_VARIANTS
from pipeline.transforms import TRAIN_MODES

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ------------------------------------------------------------------------------------------ schema
def key(default: Any, meaning: str) -> Any:
    """A config key: its default and one line of meaning (``--help`` lists them from here)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": meaning})
    return field(default=default, metadata={"help": meaning})


PRESET_VALUE = "null: the preset's value"
DIRECTIONS = ("AtoB", "BtoA")  # the official --direction (which domain is the input)

# The model section is CUTConfig's fields (cut/model.py: their types, defaults and value checks) under
# the meanings below, in this order, plus the keys the run adds. Its only changes to them: a list for
# nce_layers (YAML has no tuples), and null for the keys whose default depends on the preset or device.
RUN_MODEL_KEYS = {"direction": (str, "AtoB"), "init_from": (str, "")}  # (type, default); not CUTConfig's
NOT_MODEL_KEYS = ("lr", "beta1", "beta2", "reuse_keys")  # CUTConfig fields set from train.*, or by benches
PRESET_KEYS = tuple(PRESETS["CUT"])  # null: the preset's value (lambda_NCE, nce_idt, flip_equivariance)
CUDA_KEYS = ("channels_last", "bf16")  # null: on for CUDA
MODEL_MEANINGS = {
    "preset": "CUT or FastCUT: the official presets (NCE weight, identity NCE, flips, epochs); SinCUT: one "
              "source and one target image (configs/sincut.yaml; README.md, SinCUT)",
    "input_nc": "channels the generator takes: 1 (L), 2 (LA), 3 (RGB), 4 (RGBA); images are converted to "
                "it; more: .npy arrays (docs/inference.md, Channels and bit depth)",
    "output_nc": "channels it writes (and the discriminator sees), as model.input_nc",
    "ngf": "generator width (filters of its first layer)",
    "ndf": "discriminator width",
    "netG": "generator: resnet_9blocks or resnet_6blocks; unet_128 and unet_256 only translate (the "
            "official CUT cannot train a U-Net), so training refuses them",
    "netD": "discriminator: basic (the 70x70 PatchGAN), n_layers (a PatchGAN of model.n_layers_D layers) or "
            "pixel (1x1 PixelGAN)",
    "n_blocks": "ResNet blocks in the generator; null: as model.netG names (9 or 6)",
    "n_layers_D": "layers of the n_layers discriminator (must stay 3 with basic and pixel)",
    "normG": "generator norm: instance, batch (synchronised across GPUs under DDP) or none",
    "normD": "discriminator norm: instance, batch or none",
    "no_dropout": "no dropout in the generator (official CUT default); false: Dropout(0.5) in every ResNet "
                  "block",
    "antialias": "blur-pool downsampling (the official default)",
    "antialias_up": "blur upsampling (the official default)",
    "init_type": "weight init of G, D and F: normal, xavier (the official CUT default), kaiming or "
                 "orthogonal",
    "init_gain": "scale of the normal, xavier and orthogonal inits",
    "netF_nc": "width of the PatchNCE projection heads",
    "netF": "PatchNCE head: mlp_sample (a 2-layer MLP per layer, official default), sample (the sampled "
            "features, no parameters) or reshape (4x4 average-pooled cells as the patches; num_patches "
            "unused) (§18)",
    "num_patches": "patches sampled per layer for PatchNCE",
    "nce_layers": "generator layers whose features PatchNCE compares",
    "nce_T": "PatchNCE temperature",
    "nce_includes_all_negatives_from_minibatch": "PatchNCE negatives from every image of the batch, not just "
                                                 "the query's own (SinCUT's setting)",
    "lambda_GAN": "weight of the adversarial loss",
    "lambda_NCE": f"weight of the PatchNCE loss; {PRESET_VALUE} (1 CUT, 10 FastCUT)",
    "nce_idt": f"identity PatchNCE on real B; {PRESET_VALUE} (on for CUT)",
    "flip_equivariance": f"flip-equivariance augmentation; {PRESET_VALUE} (FastCUT)",
    "gan_mode": "adversarial loss: lsgan, vanilla, nonsaturating or wgangp (-/+ mean)",
    "lambda_gp": "weight of the WGAN-GP gradient penalty added to D's loss; 0: none, as the official CUT, "
                 "which never adds it (§18)",
    "direction": "AtoB: data.a is the input domain, translated into data.b's; BtoA: the reverse. eval.a "
                 "always holds held-out inputs, eval.b the target domain",
    "init_from": "fine-tune: a new run starts from this generator (our export, a run folder or state.pt, an "
                 "official latest_net_G.pth): G's weights only, at step 0; ignored when the run resumes its "
                 "own checkpoint",
    "channels_last": "channels_last memory format; null: on for CUDA",
    "bf16": "bf16 autocast; null: on for CUDA",
}


def _model_key(name: str, kind: Any, default: Any) -> tuple[Any, Any]:
    """(type, default) of the model key for CUTConfig's field ``name``."""
    if typing.get_origin(kind) is tuple:  # nce_layers: tuple[int, ...]
        kind, default = list[typing.get_args(kind)[0]], list(default)
    if name in PRESET_KEYS or name in CUDA_KEYS:
        kind, default = kind | None, None
    return kind, default


def _model_section() -> type:
    hints = typing.get_type_hints(CUTConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(CUTConfig)}
    unlisted = sorted(set(defaults) - set(MODEL_MEANINGS) - set(NOT_MODEL_KEYS))
    if unlisted:  # a new CUTConfig field must become a key (with its meaning) or say why it is none
        raise TypeError(f"CUTConfig fields missing from MODEL_MEANINGS and NOT_MODEL_KEYS: {unlisted}")
    fields = []
    for name, meaning in MODEL_MEANINGS.items():
        kind, default = RUN_MODEL_KEYS.get(name) or _model_key(name, hints[name], defaults[name])
        fields.append((name, kind, key(default, meaning)))
    doc = "The CUT model (docs/official-reference.md §1-§2: the official defaults and presets)."
    namespace = {"__doc__": doc, "__module__": __name__}
    return dataclasses.make_dataclass("ModelSection", fields, namespace=namespace)


ModelSection = _model_section()


@dataclass
class DataSection:
    """The two training domains, and how images become crops."""

    a: str = key("", "domain A: a shard set (its folder or _index.json URL), an image folder, prefix, "
                     "glob, .txt or .parquet list of URLs, or a table of encoded images (a Parquet dataset "
                     "or Delta table with one binary or datasets Image column); all but a shard set are "
                     "frozen into the run on its first start")
    b: str = key("", "domain B: as data.a")
    preprocess: str = key("resize_and_crop", "training transform, as the official --preprocess: "
                          "resize_and_crop, crop, scale_width, scale_width_and_crop, scale_shortside, "
                          "scale_shortside_and_crop or none (docs/official-reference.md §12)")
    load_size: int = key(286, "the size preprocess resizes to (resize_and_crop: load_size x load_size), "
                         "before the random crop")
    crop_size: int = key(256, "training crop (a multiple of 4)")
    workers: int | None = key(None, "DataLoader processes per rank (SinCUT: threads); null: 0 on CPU, where "
                              "the step's threads use every core, else up to 4 as the usable cores allow, "
                              "and a resumed run its own count (the order of samples depends on it)")
    flip: bool = key(True, "random horizontal flips")
    crops_per_epoch: int = key(100_000, "SinCUT only: crops of each image per epoch (the official "
                               "single-image dataset's length); an epoch is crops_per_epoch // "
                               "train.batch_size steps")


@dataclass
class TrainSection:
    """The schedule, the optimizer and what a run writes."""

    batch_size: int = key(1, "images per rank per step")
    lr: float = key(0.0002, "Adam learning rate of G, D and the NCE heads")
    beta1: float = key(0.5, "Adam beta1, in [0, 1)")
    beta2: float = key(0.999, "Adam beta2, in [0, 1)")
    n_epochs: int | None = key(None, f"epochs at the full rate; {PRESET_VALUE} (200 CUT, 150 FastCUT)")
    n_epochs_decay: int | None = key(None, f"epochs of linear decay after them; {PRESET_VALUE} (200, 50)")
    lr_policy: str = key("linear", "lr per epoch (§17): linear, step (x0.1 every lr_decay_iters epochs), "
                         "plateau or cosine (to 0 over n_epochs, then up); all run n_epochs + n_epochs_decay")
    lr_decay_iters: int = key(50, "epochs between the 10x decays of lr_policy step")
    max_steps: int | None = key(None, "stop after this many steps (null: when the schedule ends)")
    seed: int = key(0, "seeds weights, data order, crops and patches")
    checkpoint_every: int = key(1000, "steps between checkpoints (each also refreshes export/)")
    keep_last: int = key(3, "complete checkpoints kept; older ones are pruned")
    log_every: int = key(50, "steps between log lines and TensorBoard scalars")
    image_every: int = key(500, "steps between TensorBoard image grids")
    device: str = key("auto", "auto, cpu or cuda")
    start_fresh_if_unreadable: bool = key(False, "every checkpoint unreadable: start at step 0 (else stop)")


EVAL_METRICS = ("auto", "translation_score", "domain_score", "fid", "kid")


@dataclass
class EvalSection:
    """Periodic evaluation on held-out images (rank 0); the best checkpoint is kept beside the latest."""

    every: int = key(0, "steps between evaluations; 0 turns it off")
    a: str = key("", "held-out inputs (domain A; domain B with model.direction BtoA): a shard set, "
                 "folder, prefix, glob or URL list")
    b: str = key("", "held-out real images of the target domain (B; A with BtoA): the FID/KID "
                 "reference (optional)")
    domain_classifier: str = key("", "a classifier saved by jobs.eval (domain and translation scores)")
    inception_weights: str = key("", "FID Inception weights; empty: the torch hub cache")
    metric: str = key("auto", "picks checkpoints/best: translation_score or domain_score (higher is "
                      "better), fid or kid (lower); auto: fid where computable, else translation_score")
    max_images: int = key(200, "held-out images scored per evaluation")
    batch_size: int = key(16, "evaluation batch size")


@dataclass
class RunSection:
    """Where the run lives."""

    url: str = key("", "run URL: config.yaml, checkpoints/, tb/, export/ (any fsspec URL)")
    allow_config_change: bool = key(False, "resume a run whose stored config differs in keys other than "
                                    "those free to change on resume (FREE_ON_RESUME); every config the run "
                                    "used stays in config-history/")
    lease_stale_after: float = key(120.0, "seconds without a heartbeat after which another trainer may take "
                                   "over the run's lease (its owner died on another host); the owner "
                                   "beats every quarter of it")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)


def schema_keys(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, meaning) of every key of a config dataclass, sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += schema_keys(hints[f.name], f"{name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        hint = hints[f.name]
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")
        rows.append((name, kind, default, f.metadata.get("help", "")))
    return rows


def describe_keys(cls: type) -> str:
    """Every config key with its type, default and meaning, as --help lists them."""
    rows = schema_keys(cls)
    width = max(len(k) for k, *_ in rows)
    lines = []
    for name, kind, default, meaning in rows:
        shown = "null" if default is None else json.dumps(default)
        lines.append(f"  {name:<{width}}  {kind} = {shown}\n  {'':<{width}}  {meaning}")
    return "\n".join(lines)


SINCUT = "SinCUT"
EPOCH_PRESETS = {
    "CUT": (200, 200), "FastCUT": (150, 50), SINCUT: (SinCUTConfig.n_epochs, SinCUTConfig.n_epochs_decay)
}
SINCUT_PREPROCESS = "zoom_and_patch"  # the official SinCUT crops (pipeline/single_image.py)
# The model keys SinCUTConfig takes. SinCUT has no use for the others (but the run's, and netD, which
# must name its one discriminator): set to anything but their default, they are a ConfigError.
SINCUT_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(SinCUTConfig) if f.name in MODEL_MEANINGS)
SINCUT_UNUSED = tuple(
    name for name in MODEL_MEANINGS
    if name not in (*SINCUT_MODEL_KEYS, "preset", "netD", *RUN_MODEL_KEYS)
)


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


Origin = Callable[[str], str]  # a dotted key -> where its value came from, for error messages


def build(cls: type[T], data: Any, source: str | Origin, where: str = "") -> T:
    """An instance of the dataclass ``cls`` from plain data, every key and type checked. ``source``
    names where the data came from, or is a function that names it key by key."""
    origin = source if callable(source) else (lambda _key: source)
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{origin(where)}: '{where or 'top level'}' must be a mapping, got {kind}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        near = difflib.get_close_matches(unknown[0], fields, 1)
        close = [f"{where}.{name}" if where else name for name in near]
        hint = f"did you mean '{close[0]}'? " if close else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{origin(key)}: unknown config key '{key}' ({hint}known here: {known})")
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
            raise ConfigError(f"{origin(key)}: config key '{key}' must be {expected}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{origin(key)}: config key '{key}' must be a finite number, got {value!r}")
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
    given: dict[str, str] = {}  # dotted key -> the override that set it (the last one wins)
    for item in overrides:
        override = parse_override(item)
        for key in _flatten(override):
            given.pop(key, None)
            given[key] = f"command-line override {item!r}"
        data = _merge(data, override)
    return build(cls, data, _origin(source, given))


def _origin(source: str, given: dict[str, str]) -> Origin:
    """Where a key's value came from: the override that set it or a key under it, else ``source``."""

    def origin(key: str) -> str:
        for set_key, override in reversed(given.items()):
            if set_key == key or set_key.startswith(f"{key}.") or key.startswith(f"{set_key}."):
                return override
        return source

    return origin


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ------------------------------------------------------------------------------------------ resuming
#: Keys a resumed run may change without run.allow_config_change: when it stops, how often it logs,
#: saves and keeps, where it runs and with how many loader workers, how it is evaluated and where it
#: lives; never what a training step computes. A prefix ending in "." frees its whole section.
FREE_ON_RESUME = (
    "train.max_steps", "train.checkpoint_every", "train.keep_last", "train.log_every", "train.image_every",
    "train.device", "train.start_fresh_if_unreadable", "data.workers", "model.init_from", "eval.", "run.",
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) of each key both configs hold with different values; a key
    the stored config lacks (written before the key existed) is not compared."""
    old, new = _flatten(stored), _flatten(current)
    return [(k, old[k], v) for k, v in new.items() if k in old and old[k] != v]


def free_on_resume(key_name: str) -> bool:
    """Whether a resumed run may change ``key_name`` freely (FREE_ON_RESUME)."""
    return any(key_name == k or (k.endswith(".") and key_name.startswith(k)) for k in FREE_ON_RESUME)


#: Keys that shape the networks' tensors (their shapes, or their names: a dropout layer shifts the
#: numbering of the layers after it): once one changes, no checkpoint of the run loads, so a resume
#: refuses it even with run.allow_config_change. SinCUT's discriminator head is also built for
#: data.crop_size.
SHAPES_THE_NETWORKS = (
    "model.input_nc", "model.output_nc", "model.ngf", "model.ndf", "model.netG", "model.netD",
    "model.n_blocks", "model.n_layers_D", "model.normG", "model.normD", "model.no_dropout", "model.antialias",
    "model.antialias_up", "model.netF", "model.netF_nc", "model.nce_layers",
)
SINCUT_SHAPES_THE_NETWORKS = ("data.crop_size",)


def shapes_the_networks(key_name: str, preset: str) -> bool:
    """Whether changing ``key_name`` changes the tensors a checkpoint of a ``preset`` run holds."""
    return key_name in SHAPES_THE_NETWORKS or (preset == SINCUT and key_name in SINCUT_SHAPES_THE_NETWORKS)


# ---------------------------------------------------------------------------------------- training
def resolve_train_config(config: TrainConfig) -> TrainConfig:
    """Fill preset-dependent values (epochs, NCE options) and check cross-key rules."""
    m, t, d, e = config.model, config.train, config.data, config.eval
    sincut = m.preset == SINCUT
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
        ("data.a", bool(d.a), "a shard set or image source (folder, prefix, glob, URL list, table) for "
         "domain A"),
        ("data.b", bool(d.b), "a shard set or image source for domain B"),
        ("run.url", bool(config.run.url), "the run URL for checkpoints and logs"),
        ("data.crop_size", d.crop_size >= 32 and d.crop_size % 4 == 0, "a multiple of 4, at least 32"),
        ("data.load_size", d.load_size >= d.crop_size, "at least data.crop_size"),
        ("data.preprocess", sincut or d.preprocess != "fixsize", "a mode the official unaligned dataset can "
         "run (its fixsize reads a size from transform parameters it never passes)"),
        ("data.preprocess", sincut or d.preprocess in TRAIN_MODES or d.preprocess == "fixsize",
         ", ".join(TRAIN_MODES)),
        ("train.batch_size", sincut or t.batch_size == 1 or "crop" in d.preprocess,
         f"1 with data.preprocess {d.preprocess}: it keeps each image's own size, so images cannot be "
         "stacked into batches (nor can the official DataLoader)"),
        ("data.workers", d.workers is None or d.workers >= 0, ">= 0 or null"),
        ("train.batch_size", t.batch_size >= 1, ">= 1"),
        ("train.lr", t.lr > 0, "> 0"),
        ("train.beta1", 0 <= t.beta1 < 1, "in [0, 1) (Adam's first-moment decay)"),
        ("train.beta2", 0 <= t.beta2 < 1, "in [0, 1) (Adam's second-moment decay)"),
        ("train.n_epochs", t.n_epochs >= 0, ">= 0"),
        ("train.n_epochs_decay", t.n_epochs_decay >= 0, ">= 0"),
        ("train.n_epochs", t.n_epochs + t.n_epochs_decay >= 1, "such that n_epochs + n_epochs_decay >= 1"),
        ("train.lr_policy", t.lr_policy in LR_POLICIES, f"one of {', '.join(LR_POLICIES)}"),
        ("train.lr_decay_iters", t.lr_policy != "step" or t.lr_decay_iters >= 1, ">= 1 under lr_policy step"),
        ("train.seed", t.seed >= 0, ">= 0"),
        ("data.crops_per_epoch", d.crops_per_epoch >= 1, ">= 1"),
        ("run.lease_stale_after", config.run.lease_stale_after > 0, "> 0 seconds"),
        ("train.n_epochs", t.lr_policy != "cosine" or t.n_epochs >= 1, ">= 1 with lr_policy cosine"),
        ("train.max_steps", t.max_steps is None or t.max_steps >= 1, ">= 1 or null"),
        ("train.checkpoint_every", t.checkpoint_every >= 1, ">= 1"),
        ("train.keep_last", t.keep_last >= 1, ">= 1"),
        ("train.log_every", t.log_every >= 1, ">= 1"),
        ("train.image_every", t.image_every >= 1, ">= 1"),
        ("train.device", t.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
        ("eval.every", e.every >= 0, ">= 0"),
        ("eval.a", bool(e.a) or e.every == 0, "a held-out input-domain image source when eval.every > 0"),
        ("model.direction", m.direction in DIRECTIONS, " or ".join(DIRECTIONS)),
        ("eval.metric", e.metric in EVAL_METRICS, ", ".join(EVAL_METRICS)),
        (
            "eval.domain_classifier",
            bool(e.domain_classifier) or e.every == 0 or e.metric in ("auto", "fid", "kid"),
            f"a classifier file (python -m jobs.eval --train-classifier-only) for eval.metric {e.metric}",
        ),
        ("eval.b", bool(e.b) or e.every == 0 or e.metric not in ("fid", "kid"), "real B images for FID/KID"),
        (
            "eval.metric",
            e.every == 0 or e.metric != "auto" or bool(e.b or e.domain_classifier),
            "given eval.b (for FID) or eval.domain_classifier (for translation_score) when auto",
        ),
        ("eval.max_images", e.max_images >= 2, ">= 2"),
        ("eval.batch_size", e.batch_size >= 1, ">= 1"),
    ]
    if sincut:
        checks += _sincut_checks(config)
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {expected}")
    try:
        cut_config(dataclasses.replace(config, train=t), device_type="cpu")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return dataclasses.replace(config, train=t)


def _sincut_checks(config: TrainConfig) -> list[tuple[str, bool, str]]:
    """The rules model.preset SinCUT adds: its networks, RGB, its crops, and no CUT-only options."""
    m, d, t = config.model, config.data, config.train
    with_sincut = "with model.preset SinCUT"
    checks = [
        ("model.netG", m.netG in GENERATOR_VARIANTS, f"{' or '.join(GENERATOR_VARIANTS)} {with_sincut} "
         "(configs/sincut.yaml holds the official SinCUT values)"),
        ("model.netD", m.netD == "stylegan2", f"stylegan2 {with_sincut}"),
        ("model.input_nc", m.input_nc == 3, f"3 {with_sincut} (its crops are RGB, as officially)"),
        ("model.output_nc", m.output_nc == 3, f"3 {with_sincut} (its crops are RGB, as officially)"),
        ("data.preprocess", d.preprocess == SINCUT_PREPROCESS, f"{SINCUT_PREPROCESS} {with_sincut} (its "
         "official crops: random zoom, a grid cell, a flip)"),
        ("data.crop_size", d.crop_size & (d.crop_size - 1) == 0, f"a power of two {with_sincut} (the "
         "discriminator's fully connected head is built for it)"),
        ("data.crops_per_epoch", d.crops_per_epoch >= t.batch_size, "at least train.batch_size"),
    ]
    defaults = ModelSection()
    for name in SINCUT_UNUSED:
        value, default = getattr(m, name), getattr(defaults, name)
        off = value == default or (default is None and value is False)  # a null switch may also be off
        checks.append((f"model.{name}", off,
                       f"left at {default!r} {with_sincut}, which has no such option (got {value!r})"))
    return checks


def sincut_config(config: TrainConfig) -> SinCUTConfig:
    """The SinCUT model config: the model keys SinCUTConfig shares, data.crop_size and data.load_size
    (they size the networks), the optimizer, batch and epochs; unset (None) keys keep SinCUT's
    official values (cut/sincut.py). lambda_R1, lambda_identity and num_downsampling stay official."""
    m, d, t = config.model, config.data, config.train
    fields: dict[str, Any] = {k: getattr(m, k) for k in SINCUT_MODEL_KEYS if getattr(m, k) is not None}
    fields.update(
        nce_layers=tuple(m.nce_layers), crop_size=d.crop_size, load_size=d.load_size, lr=t.lr, beta1=t.beta1,
        beta2=t.beta2, batch_size=t.batch_size,
    )
    if t.n_epochs is not None:
        fields.update(n_epochs=t.n_epochs, n_epochs_decay=t.n_epochs_decay)
    return SinCUTConfig(**fields)


def cut_config(config: TrainConfig, device_type: str) -> CUTConfig | SinCUTConfig:
    """The model config of a training config; bf16 and channels_last default to on for CUDA.

    Every model key is a CUTConfig field of the same name; unset (None) ones keep the preset's value.
    model.preset SinCUT gives a SinCUTConfig (``sincut_config``).
    """
    m, t = config.model, config.train
    if m.preset == SINCUT:
        return sincut_config(config)
    on_cuda = device_type == "cuda"
    fields = {k: v for k, v in dataclasses.asdict(m).items() if v is not None}
    for run_key in ("preset", *RUN_MODEL_KEYS):
        fields.pop(run_key)
    fields.update(
        lr=t.lr,
        beta1=t.beta1,
        beta2=t.beta2,
        channels_last=on_cuda if m.channels_last is None else m.channels_last,
        bf16=on_cuda if m.bf16 is None else m.bf16,
    )
    return CUTConfig.from_preset(m.preset, **fields)
