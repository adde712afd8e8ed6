"""Official checkpoints and our generator export load safely, or fail with a clear error."""

import pickle

import pytest
import torch

from cut import CUTConfig, CUTModel, ResnetGenerator
from cut.checkpoint import (
    CheckpointError,
    export_generator,
    generator_from_checkpoint,
    infer_generator_architecture,
    load_strict,
    official_state_dicts,
    read_checkpoint,
    to_bytes,
)


def small_model():
    return CUTModel(CUTConfig.from_preset("CUT", ngf=8, ndf=8, n_blocks=2, netF_nc=16, num_patches=16))


def test_export_round_trip_gives_the_same_translation():
    m = small_model()
    data = to_bytes(export_generator(m.netG, preset="CUT"))
    g = generator_from_checkpoint(read_checkpoint(data, "export.pt"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(g(x), m.netG(x))


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_layout_loads_with_or_without_module_prefix(prefix):
    m = small_model()
    sds = official_state_dicts(m)
    assert sorted(sds) == ["D", "F", "G"]
    for name, net in (("G", m.netG), ("D", m.netD), ("F", m.netF)):
        prefixed = {prefix + k: v for k, v in sds[name].items()}
        fresh = type(net)(**({} if name != "G" else m.netG.architecture)) if name == "G" else None
        target = fresh if fresh is not None else net
        load_strict(target, read_checkpoint(to_bytes(prefixed)), name)
    g = generator_from_checkpoint(read_checkpoint(to_bytes({prefix + k: v for k, v in sds["G"].items()})))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(g(x), m.netG(x))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"n_blocks": 6}, {"ngf": 16, "antialias": False}, {"antialias_up": False}, {"output_nc": 1}],
)
def test_generator_architecture_is_recovered_from_an_official_state_dict(kwargs):
    g = ResnetGenerator(**kwargs)
    assert infer_generator_architecture(g.state_dict()) == g.architecture


def test_training_state_is_accepted_as_a_generator_checkpoint():
    m = small_model()
    g = generator_from_checkpoint(read_checkpoint(to_bytes(m.state_dict())))
    assert g.architecture == m.netG.architecture


def test_corrupt_empty_and_foreign_checkpoints_are_clear_errors():
    data = to_bytes(export_generator(ResnetGenerator(ngf=8, n_blocks=2)))
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: not a readable torch checkpoint"):
        read_checkpoint(data[: len(data) // 2], "ckpt.pt")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(b"", "ckpt.pt")


@pytest.mark.parametrize(("data", "kind"), [(b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image"),
                                           (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"epochs: 3\n", "text")])
def test_a_file_that_is_no_checkpoint_says_what_it_looks_like_and_what_is_accepted(data, kind):
    with pytest.raises(CheckpointError) as given:
        read_checkpoint(data, "horse.jpg")
    text = str(given.value)
    assert text.startswith(f"horse.jpg: not a readable torch checkpoint: it looks like {kind}; accepted:")
    assert "weights_only" not in text and "KeyError" not in text


def test_a_checkpoint_holding_code_is_refused_without_torch_advice_to_unpickle_it():
    data = to_bytes({"G": {}, "hook": print})
    with pytest.raises(CheckpointError) as given:
        read_checkpoint(data, "evil.pt")
    assert "objects other than weights" in str(given.value) and "weights_only" not in str(given.value)
    with pytest.raises(CheckpointError, match="neither a generator export"):
        generator_from_checkpoint({"weights": [1, 2, 3]}, "x.pt")
    with pytest.raises(CheckpointError, match=r"no key .model\.1\.weight."):
        generator_from_checkpoint({"conv.weight": torch.zeros(1)}, "x.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_never_executed(capsys):
    data = pickle.dumps({"model.1.weight": _Payload()})
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        read_checkpoint(data, "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out


def test_checkpoint_of_another_architecture_names_the_mismatch():
    exported = export_generator(ResnetGenerator(ngf=8, n_blocks=2))
    exported["state_dict"]["model.1.weight"] = torch.zeros(4, 3, 7, 7)
    with pytest.raises(
        CheckpointError, match=r"g.pt: G: .*model\.1\.weight \(4, 3, 7, 7\) != \(8, 3, 7, 7\)"
    ):
        generator_from_checkpoint(exported, "g.pt")


def test_load_strict_refuses_non_tensors_broadcast_views_integer_and_non_finite_weights():
    """Every network loaded through load_strict (a training resume, the domain classifier, the
    Inception weights, model.init_from) gets the checks a generator checkpoint gets."""
    net = ResnetGenerator(ngf=4, n_blocks=1)
    own = net.state_dict()
    faults = {
        "a list": r"'model\.1\.weight' is a list",
        torch.zeros(1).expand(4, 3, 7, 7): r"declares shape \(4, 3, 7, 7\) but holds 4 bytes",
        torch.zeros(4, 3, 7, 7, dtype=torch.int64): r"dtype mismatch: \['model\.1\.weight torch\.int64",
        torch.full((4, 3, 7, 7), float("-inf")): r"1 of \d+ tensors hold NaN or Inf",
    }
    for bad, message in faults.items():
        value = [0.0] if isinstance(bad, str) else bad
        with pytest.raises(CheckpointError, match=message):
            load_strict(net, {**own, "model.1.weight": value}, "G")
    assert torch.equal(net.state_dict()["model.1.weight"], own["model.1.weight"])  # nothing was loaded


def test_an_official_state_dict_whose_empty_tensors_declare_giant_widths_is_refused_before_building():
    """A zero-element tensor costs nothing to store and may declare any width; the architecture
    inferred from it is bounds-checked before the generator is built (which would need ~600 GB)."""
    state = {"model.1.weight": torch.zeros(10**9, 3, 0, 0), "model.10.conv_block.1.weight": torch.zeros(0)}
    with pytest.raises(CheckpointError, match=r"x\.pth: G: the architecture inferred from its tensors has "
                                              r"output_nc=1000000000; expected an integer in 1\.\.1024"):
        generator_from_checkpoint(state, "x.pth")


def test_huge_but_finite_weights_load_and_a_single_inf_or_nan_is_refused():
    """Weights are proven finite by their sum first: a sum that overflows (finite weights near the
    float32 maximum) must not refuse a good checkpoint, and one bad element anywhere must."""
    m = small_model()
    state = export_generator(m.netG, preset="CUT")
    weights = state["state_dict"]
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 8)
    weights[name] = torch.full_like(weights[name], 3e38)  # the sum overflows to inf; every element is finite
    generator_from_checkpoint(read_checkpoint(to_bytes(state), "huge.pt"))
    for bad in (float("inf"), float("nan")):
        spoiled = torch.zeros_like(weights[name])
        spoiled.view(-1)[5] = bad
        weights[name] = spoiled
        with pytest.raises(CheckpointError, match="hold NaN or Inf"):
            generator_from_checkpoint(read_checkpoint(to_bytes(state), "bad.pt"))


def test_loading_a_checkpoint_does_not_import_the_compiler_stack():
    """A job's start-up: checking a checkpoint builds the network on the meta device, which must not
    pull in torch._dynamo (seconds of import in every job, Ray actor and test process)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from cut import ResnetGenerator\n"
            "from cut.checkpoint import export_generator, generator_from_checkpoint, read_checkpoint\n"
            "from cut.checkpoint import to_bytes\n"
            "data = to_bytes(export_generator(ResnetGenerator(ngf=8, n_blocks=2), preset='CUT'))\n"
            "generator_from_checkpoint(read_checkpoint(data, 'g.pt'))\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
