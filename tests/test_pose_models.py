"""hgloss.pose.models: output shapes, parameter counts, checkpoint loading and CPU speed."""

import copy

import pytest
import torch
from torch import nn

from hgloss.pose.models import MODEL_NAMES, HRNet, SimpleBaseline, build_model, load_pretrained_backbone

# Exact counts with 17 joints; the module docstring of hgloss.pose.models quotes them.
PARAMETER_COUNTS = {
    "simplebaseline_res18": 15_376_721,
    "simplebaseline_res50": 33_999_697,
    "simplebaseline_res101": 52_991_825,
    "simplebaseline_res152": 68_635_473,
    "hrnet_w32": 28_536_113,
    "hrnet_w48": 63_595_745,
    "simplebaseline_res18_small": 965_729,
    "hrnet_w8_small": 719_321,
}

# Millions of parameters at 256x192 in the papers (Xiao et al. 2018, Table 2; Sun et al. 2019, Table 1).
PUBLISHED_MILLIONS = {
    "simplebaseline_res50": 34.0,
    "simplebaseline_res101": 53.0,
    "simplebaseline_res152": 68.6,
    "hrnet_w32": 28.5,
    "hrnet_w48": 63.6,
}

SMALL_MODELS = ["simplebaseline_res18_small", "hrnet_w8_small"]
SIMPLEBASELINE_HEAD = ("deconv_layers.", "final_layer.")
RESNET_PARTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape(name):
    model = build_model(name).eval()
    with torch.no_grad():
        heatmaps = model(torch.randn(2, 3, 256, 192))
    assert heatmaps.shape == (2, 17, 64, 48)
    assert torch.isfinite(heatmaps).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count(name):
    count = count_parameters(build_model(name))
    print(f"{name}: {count:,} parameters")
    assert count == PARAMETER_COUNTS[name]
    if name in PUBLISHED_MILLIONS:
        assert count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.01)


def test_every_name_has_a_pinned_count():
    assert set(MODEL_NAMES) == set(PARAMETER_COUNTS)
    assert {"simplebaseline_res18", "simplebaseline_res50", "hrnet_w32", "hrnet_w48", *SMALL_MODELS} <= set(MODEL_NAMES)


def test_num_joints_and_unknown_name():
    assert build_model("hrnet_w8_small", num_joints=14).final_layer.out_channels == 14
    with pytest.raises(ValueError, match="hrnet_w32.*simplebaseline_res18_small|simplebaseline_res18_small.*hrnet_w32"):
        build_model("hrnet_w64")


# torchvision's resnet18 / resnet50 parameter counts, and those of their 1000-class fc layer.
TORCHVISION_RESNETS = [(18, 11_689_512, 513_000), (50, 25_557_032, 2_049_000)]


@pytest.mark.parametrize(("depth", "torchvision_params", "fc_params"), TORCHVISION_RESNETS)
def test_simplebaseline_backbone_is_torchvision_resnet(depth, torchvision_params, fc_params):
    model = SimpleBaseline(depth=depth)
    backbone = sum(count_parameters(getattr(model, part)) for part in RESNET_PARTS)
    assert backbone == torchvision_params - fc_params
    keys = model.state_dict()
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys
    # A bottleneck network widens channels in layer1, so its first block has a shortcut conv too.
    assert ("layer1.0.downsample.0.weight" in keys) == ("layer4.2.conv3.weight" in keys) == (depth == 50)


def test_simplebaseline_init_follows_the_paper_code():
    model = SimpleBaseline(depth=18, width=16, deconv_channels=64)
    deconv = model.deconv_layers[0]
    assert isinstance(deconv, nn.ConvTranspose2d) and deconv.bias is None
    geometry = (deconv.kernel_size, deconv.stride, deconv.padding, deconv.output_padding)
    assert geometry == ((4, 4), (2, 2), (1, 1), (0, 0))
    assert deconv.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert model.final_layer.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert (model.final_layer.bias == 0).all()
    batch_norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert all((bn.weight == 1).all() and (bn.bias == 0).all() for bn in batch_norms)


def test_hrnet_keys_follow_the_official_code():
    keys = HRNet(width=8).state_dict()
    for key in (
        "conv2.weight",
        "layer1.3.bn3.bias",
        "transition1.0.0.weight",  # 256 -> w, 3x3
        "transition1.1.0.0.weight",  # new branch from the stride-4 map
        "transition3.3.0.0.weight",
        "stage2.0.branches.1.3.conv2.weight",
        "stage3.3.fuse_layers.2.0.1.0.weight",  # two strided convs from branch 0 into branch 2
        "stage4.2.fuse_layers.0.3.0.weight",  # 1x1 conv from branch 3 into branch 0
        "final_layer.bias",
    ):
        assert key in keys, key
    # Only the high-resolution output survives the last module, and transitions keep no weights
    # for unchanged branches.
    assert not any(key.startswith(("stage4.2.fuse_layers.1.", "transition2.0.", "transition2.1.")) for key in keys)
    assert "stage4.1.fuse_layers.3.0.0.0.weight" in keys


def resnet_checkpoint(source: SimpleBaseline) -> nn.Module:
    """A module with torchvision ResNet key names: the source's backbone plus a 1000-class fc."""
    resnet = nn.Module()
    for part in RESNET_PARTS:
        resnet.add_module(part, copy.deepcopy(getattr(source, part)))
    resnet.fc = nn.Linear(source.deconv_layers[0].in_channels, 1000)
    return resnet


def test_load_torchvision_resnet_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = SimpleBaseline(depth=18, width=16, deconv_channels=64)
    resnet = resnet_checkpoint(source)
    path = tmp_path / "resnet18.pth"
    torch.save({f"module.{key}": value for key, value in resnet.state_dict().items()}, path)

    torch.manual_seed(2)
    model = SimpleBaseline(depth=18, width=16, deconv_channels=64)
    initial = model.state_dict()
    head_before = {key: value.clone() for key, value in initial.items() if key.startswith(SIMPLEBASELINE_HEAD)}
    report = load_pretrained_backbone(model, str(path))

    backbone_keys = [key for key in initial if not key.startswith(SIMPLEBASELINE_HEAD)]
    assert report["loaded"] == backbone_keys
    assert report["missing"] == list(head_before)
    assert report["unexpected"] == ["module.fc.weight", "module.fc.bias"]
    state = model.state_dict()
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    for key, value in head_before.items():
        assert torch.equal(state[key], value), key


def test_load_nested_mmpose_and_hrnet_checkpoints(tmp_path):
    source = SimpleBaseline(depth=18, width=16, deconv_channels=64)
    mmpose_state = {f"backbone.{key}": value for key, value in source.state_dict().items()}
    path = tmp_path / "mmpose.pth"
    torch.save({"meta": {"epoch": 210}, "state_dict": mmpose_state}, path)
    report = load_pretrained_backbone(SimpleBaseline(depth=18, width=16, deconv_channels=64), path)
    assert report["missing"] == [] and report["unexpected"] == []

    hrnet = build_model("hrnet_w8_small")
    path = tmp_path / "hrnet.pth"
    torch.save({"model": {f"module.{key}": value for key, value in hrnet.state_dict().items()}}, path)
    model = build_model("hrnet_w8_small")
    report = load_pretrained_backbone(model, path)
    assert report["loaded"] == list(hrnet.state_dict()) and report["missing"] == []
    assert torch.equal(model.stage4[0].fuse_layers[0][3][0].weight, hrnet.stage4[0].fuse_layers[0][3][0].weight)


def test_load_shape_mismatch_raises(tmp_path):
    resnet = resnet_checkpoint(SimpleBaseline(depth=18, width=32, deconv_channels=64))
    path = tmp_path / "wide.pth"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(ValueError, match=r"conv1\.weight \(file \(32, 3, 7, 7\), model \(16, 3, 7, 7\)\)"):
        load_pretrained_backbone(SimpleBaseline(depth=18, width=16, deconv_channels=64), path)


def test_load_unrelated_file_raises(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch.save({"encoder.embed.weight": torch.zeros(10, 4), "decoder.proj.bias": torch.zeros(4)}, path)
    with pytest.raises(ValueError, match=r"unrelated\.pth.*encoder\.embed\.weight.*conv1\.weight"):
        load_pretrained_backbone(build_model("hrnet_w8_small"), path)
    path = tmp_path / "no_tensors.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="no tensors"):
        load_pretrained_backbone(build_model("hrnet_w8_small"), path)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_variant_learns_a_fixed_batch(name):
    """Every parameter gets a gradient, and a few Adam steps fit a fixed batch better. (Speed is
    the benchmarks' business, not a test's.)"""
    torch.manual_seed(0)
    model = build_model(name).train()
    images = torch.randn(2, 3, 256, 192)
    target = torch.rand(2, 17, 64, 48)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(images), target)
        loss.backward()
        if not losses:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
