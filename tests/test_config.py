"""The config system: YAML plus overrides, every key validated, presets resolved."""

import dataclasses
import re

import pytest
import yaml

from cut import CUTConfig
from cut.schedule import lr_factor
from cut.sincut import SinCUTConfig
from jobs.config import (
    SHAPES_THE_NETWORKS,
    SINCUT_UNUSED,
    ConfigError,
    ModelSection,
    TrainConfig,
    config_changes,
    cut_config,
    free_on_resume,
    load_config,
    resolve_train_config,
    schema_keys,
    shapes_the_networks,
    to_dict,
    to_yaml,
)

REQUIRED = ["data.a=/a", "data.b=/b", "run.url=/run"]


def test_shipped_configs_reproduce_the_official_presets():
    cut = resolve_train_config(load_config(TrainConfig, "configs/cut.yaml", REQUIRED))
    fast = resolve_train_config(load_config(TrainConfig, "configs/fastcut.yaml", REQUIRED))
    assert (cut.train.n_epochs, cut.train.n_epochs_decay) == (200, 200)
    assert (fast.train.n_epochs, fast.train.n_epochs_decay) == (150, 50)
    for c in (cut, fast):
        assert (c.train.batch_size, c.train.lr, c.train.beta1, c.train.beta2) == (1, 0.0002, 0.5, 0.999)
        assert (c.data.load_size, c.data.crop_size) == (286, 256)
    model_cut, model_fast = cut_config(cut, "cpu"), cut_config(fast, "cpu")
    assert (model_cut.nce_idt, model_cut.lambda_NCE, model_cut.flip_equivariance) == (True, 1.0, False)
    assert (model_fast.nce_idt, model_fast.lambda_NCE, model_fast.flip_equivariance) == (False, 10.0, True)
    assert not model_cut.bf16 and cut_config(cut, "cuda").bf16 and cut_config(cut, "cuda").channels_last


def test_overrides_are_typed_and_yaml11_floats_are_accepted():
    c = load_config(
        TrainConfig, "configs/tiny.yaml", ["train.lr=1e-3", "model.lambda_NCE=2", "train.max_steps=3"]
    )
    assert c.train.lr == 0.001 and c.model.lambda_NCE == 2.0 and isinstance(c.model.lambda_NCE, float)
    assert c.train.max_steps == 3 and isinstance(c.train.max_steps, int)
    assert load_config(TrainConfig, text=to_yaml(c)) == c  # the resolved config round-trips


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("model.extra.x=1", "unknown config key 'model.extra'"),
        ("train.lr=fast", "config key 'train.lr' must be float"),
        ("train.batch_size=1.5", "config key 'train.batch_size' must be int"),
        ("model.antialias=maybe", "config key 'model.antialias' must be bool"),
        ("train.lr", "not of the form key.sub=value"),
    ],
)
def test_bad_keys_and_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(TrainConfig, "configs/tiny.yaml", [override])



def test_a_bad_key_is_blamed_on_where_it_came_from_with_the_nearest_known_key(tmp_path):
    with pytest.raises(ConfigError) as given:
        load_config(TrainConfig, "configs/tiny.yaml", ["train.lr=1e-3", "train.max_step=10"])
    assert str(given.value).startswith("command-line override 'train.max_step=10': unknown config key")
    assert "did you mean 'train.max_steps'?" in str(given.value)
    with pytest.raises(ConfigError, match=r"^command-line override 'train\.lr=fast': config key 'train\.lr'"):
        load_config(TrainConfig, "configs/tiny.yaml", ["train.lr=fast"])
    (tmp_path / "typo.yaml").write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown config key 'trian' \(did you mean 'train'\?"):
        load_config(TrainConfig, str(tmp_path / "typo.yaml"), ["train.max_steps=3"])

@pytest.mark.parametrize(
    "override,key",
    [
        ("data.crop_size=30", "data.crop_size"),
        ("model.preset=CycleGAN", "model.preset"),
        ("train.keep_last=0", "train.keep_last"),
        ("model.gan_mode=wgan", "model.gan_mode"),
        ("model.init_type=uniform", "model.init_type"),
        ("model.init_gain=0", "model.init_gain"),
    ],
)
def test_cross_key_rules_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [*REQUIRED, override]))


def test_missing_urls_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.a"):
        resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, str(tmp_path / "bad.yaml"))


def test_linear_schedule_matches_the_official_policy():
    # Official epoch k (1-based) uses 1 - max(0, k - n_epochs) / (n_epochs_decay + 1).
    assert lr_factor(0, 200, 200) == 1.0
    assert lr_factor(199, 200, 200) == 1.0
    assert lr_factor(200, 200, 200) == pytest.approx(1 - 1 / 201)
    assert lr_factor(399, 200, 200) == pytest.approx(1 / 201)


FLOAT_KEYS = [name for name, kind, _, _ in schema_keys(TrainConfig) if kind.startswith("float")]


def test_every_float_key_of_the_training_config_is_covered():
    assert {"train.lr", "train.beta1", "train.beta2", "model.lambda_NCE", "model.nce_T",
            "run.lease_stale_after"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "inf", "nan"])
@pytest.mark.parametrize("name", FLOAT_KEYS)
def test_a_float_key_that_is_not_finite_is_an_error_naming_the_key(name, value):
    with pytest.raises(ConfigError, match=rf"config key '{name}' must be a finite number"):
        load_config(TrainConfig, "configs/tiny.yaml", [*REQUIRED, f"{name}={value}"])


@pytest.mark.parametrize(
    "override",
    ["train.lr=-0.0002", "train.lr=0", "train.beta1=-0.1", "train.beta1=1", "train.beta2=1.5",
     "model.lambda_NCE=-1", "model.lambda_GAN=-0.5", "model.lambda_gp=-1", "model.nce_T=0",
     "model.init_gain=-0.02", "run.lease_stale_after=0", "model.netF_nc=0", "train.seed=-1",
     "data.crops_per_epoch=0", "train.lr_policy=step train.lr_decay_iters=0"],
)
def test_a_numeric_key_outside_its_range_is_an_error_naming_the_key(override):
    overrides = override.split()
    name = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [*REQUIRED, *overrides]))


def test_keys_free_to_change_on_resume_are_where_and_how_a_run_executes_not_what_it_computes():
    assert all(free_on_resume(k) for k in ("train.max_steps", "train.log_every", "data.workers",
                                           "eval.every", "run.allow_config_change", "train.device"))
    assert not any(free_on_resume(k) for k in ("train.lr", "model.lambda_NCE", "data.a", "train.seed",
                                               "train.batch_size", "model.ngf"))
    old = load_config(TrainConfig, "configs/tiny.yaml", REQUIRED)
    new = load_config(TrainConfig, "configs/tiny.yaml", [*REQUIRED, "train.lr=0.001", "train.max_steps=9"])
    changes = config_changes(to_dict(old), to_dict(new))
    assert changes == [("train.lr", 0.0002, 0.001), ("train.max_steps", 8, 9)]
    stored = to_dict(old)
    del stored["run"]["lease_stale_after"]  # a config written before the key existed
    assert config_changes(stored, to_dict(old)) == []


def test_the_model_section_is_cutconfigs_fields_with_their_defaults():
    defaults = CUTConfig()
    model_keys = {f.name for f in dataclasses.fields(ModelSection)}
    for f in dataclasses.fields(CUTConfig):
        assert f.name in model_keys or f.name in ("lr", "beta1", "beta2", "reuse_keys"), f.name
    section = ModelSection()
    for name in model_keys - {"direction", "init_from"}:
        value = getattr(section, name)
        if value is None:  # null: the preset's value, or on for CUDA
            assert name in ("lambda_NCE", "nce_idt", "flip_equivariance", "channels_last", "bf16", "n_blocks")
        else:
            expected = getattr(defaults, name)
            assert value == (list(expected) if name == "nce_layers" else expected), name


def test_sincut_refuses_exactly_the_model_keys_it_has_no_field_for():
    assert set(SINCUT_UNUSED) == {"n_blocks", "n_layers_D", "normG", "normD", "no_dropout", "antialias",
                                  "antialias_up", "netF", "flip_equivariance", "lambda_gp", "channels_last",
                                  "bf16"}


@pytest.mark.parametrize("preset", ["configs/tiny.yaml", "configs/sincut.yaml"])
@pytest.mark.parametrize(
    "override,message",
    [
        ("model.init_type=uniform", "config key 'model.init_type' must be normal, xavier, kaiming, "
                                    "orthogonal"),
        ("model.init_gain=0", "config key 'model.init_gain' must be > 0"),
        ("model.netF_nc=0", "config key 'model.netF_nc' must be >= 1"),
    ],
)
def test_a_model_value_is_checked_once_by_the_model_config_in_the_words_of_the_key(preset, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_train_config(load_config(TrainConfig, preset, [*REQUIRED, override]))
    name, value = override.removeprefix("model.").split("=")
    model_config = CUTConfig if preset.endswith("tiny.yaml") else SinCUTConfig
    with pytest.raises(ValueError, match=re.escape(message)):
        model_config(**{name: yaml.safe_load(value)})


# One changed value per model key (with what the change needs beside it); a new key must be added here.
NETWORK_CHANGES = {
    "preset": ["model.preset=FastCUT"],
    "input_nc": ["model.input_nc=1", "model.nce_idt=false"],
    "output_nc": ["model.output_nc=1", "model.nce_idt=false"],
    "ngf": ["model.ngf=4"],
    "ndf": ["model.ndf=4"],
    "netG": ["model.netG=resnet_6blocks", "model.n_blocks=null"],
    "netD": ["model.netD=pixel"],
    "n_blocks": ["model.n_blocks=3"],
    "n_layers_D": ["model.netD=n_layers", "model.n_layers_D=4"],
    "normG": ["model.normG=batch"],
    "normD": ["model.normD=batch"],
    "no_dropout": ["model.no_dropout=false"],
    "antialias": ["model.antialias=false"],
    "antialias_up": ["model.antialias_up=false"],
    "init_type": ["model.init_type=normal"],
    "init_gain": ["model.init_gain=0.5"],
    "netF_nc": ["model.netF_nc=8"],
    "netF": ["model.netF=sample"],
    "num_patches": ["model.num_patches=8"],
    "nce_layers": ["model.nce_layers=[0,4]"],
    "nce_T": ["model.nce_T=0.1"],
    "nce_includes_all_negatives_from_minibatch": ["model.nce_includes_all_negatives_from_minibatch=true"],
    "lambda_GAN": ["model.lambda_GAN=2"],
    "lambda_NCE": ["model.lambda_NCE=2"],
    "nce_idt": ["model.nce_idt=false"],
    "flip_equivariance": ["model.flip_equivariance=true"],
    "gan_mode": ["model.gan_mode=vanilla"],
    "lambda_gp": ["model.lambda_gp=1"],
    "direction": ["model.direction=BtoA"],
    "init_from": ["model.init_from=g.pt"],
    "channels_last": ["model.channels_last=true"],
    "bf16": ["model.bf16=true"],
}


def network_shapes(*overrides: str) -> dict[str, tuple[int, ...]]:
    from cut import CUTModel

    config = resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [*REQUIRED, *overrides]))
    state = CUTModel(cut_config(config, "cpu")).state_dict()
    return {f"{net}.{k}": tuple(v.shape) for net in ("G", "D", "F") for k, v in state[net].items()}


def test_the_keys_that_shape_the_networks_are_exactly_those_whose_change_no_checkpoint_survives():
    model_keys = {f.name for f in dataclasses.fields(ModelSection)}
    assert set(NETWORK_CHANGES) == model_keys
    base = network_shapes("model.netD=n_layers")  # n_layers_D's change needs the n_layers discriminator
    shaping = {f"model.{name}" for name, change in NETWORK_CHANGES.items()
               if network_shapes("model.netD=n_layers", *change) != base}
    assert shaping == set(SHAPES_THE_NETWORKS)
    assert shapes_the_networks("data.crop_size", "SinCUT")
    assert not shapes_the_networks("data.crop_size", "CUT")
