"""The FID Inception network: the weights file's layout, loading, and the error when the file is missing."""

from __future__ import annotations

import pytest
import torch

import jobs.quality
from cut.checkpoint import CheckpointError, read_checkpoint, to_bytes
from cut.inception import NUM_CLASSES, WEIGHTS_NAME, FIDInception, InceptionWeightsError, fid_inception
from jobs.quality import load_inception

# Shapes of the weights file (torchvision's Inception v3 key names; TensorFlow's 1008 classes).
KNOWN_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision documents 27,161,264 parameters for Inception v3 with its aux classifier and 1000 classes;
# the FID network has no aux classifier (3,326,696 parameters) and 8 more classes in fc (8 x 2049).
FID_INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 8 * 2049


def test_parameter_names_and_shapes_match_the_weights_file_layout():
    net = FIDInception()
    state = net.state_dict()
    for key, shape in KNOWN_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in net.parameters()) == FID_INCEPTION_PARAMETERS
    convs = [k for k in state if k.endswith(".conv.weight")]
    assert len(convs) == 94  # every conv has a BatchNorm with eps 0.001 and no bias of its own
    assert all(net.get_submodule(k.removesuffix(".conv.weight")).bn.eps == 0.001 for k in convs)
    assert not any("AuxLogits" in k for k in state) and NUM_CLASSES == 1008
    assert len(state) == 94 * 6 + 2


def test_a_saved_state_dict_loads_strictly_and_computes_the_same_features():
    torch.manual_seed(0)
    source = FIDInception().eval()
    state = read_checkpoint(to_bytes(source.state_dict()), "weights.pth")
    # Files written before BatchNorm counted batches lack num_batches_tracked: they load too.
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    loaded = fid_inception(old_style, "weights.pth")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 40, 48) * 2 - 1
    with torch.inference_mode():
        expected, got = source(x), loaded(x)
    assert got.shape == (2, 2048)
    # Random weights give tiny activations: compare relatively, and check that the inputs still tell apart.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert not torch.allclose(got[0], got[1], rtol=1e-2, atol=0)


def test_a_state_dict_of_another_layout_is_a_clear_error():
    state = FIDInception().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)
    del state["Mixed_7c.branch_pool.conv.weight"]
    with pytest.raises(CheckpointError, match=r"other\.pth: not the FID Inception weights.*Mixed_7c"):
        fid_inception(state, "other.pth")


def test_missing_weights_say_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected_path = str(tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_NAME)
    with pytest.raises(InceptionWeightsError) as offline:
        load_inception(download=False)
    message = str(offline.value)
    assert WEIGHTS_NAME in message and expected_path in message and "--inception-weights" in message

    monkeypatch.setattr(jobs.quality, "WEIGHTS_URL", "http://127.0.0.1:9/" + WEIGHTS_NAME)  # refused at once
    with pytest.raises(InceptionWeightsError, match="could not be downloaded") as failed:
        load_inception()
    assert expected_path in str(failed.value)

    with pytest.raises(InceptionWeightsError, match=r"--inception-weights .*nowhere\.pth does not exist"):
        load_inception(str(tmp_path / "nowhere.pth"))


def test_weights_in_the_hub_cache_are_found_without_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / WEIGHTS_NAME
    path.parent.mkdir(parents=True)
    path.write_bytes(to_bytes(FIDInception().state_dict()))
    assert isinstance(load_inception(download=False), FIDInception)
