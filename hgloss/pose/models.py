"""Heatmap pose networks: SimpleBaseline (Xiao et al. 2018) and HRNet (Sun et al. 2019).

Both map an image batch (B, 3, H, W) to heatmaps (B, K, H/4, W/4), K = num_joints; at the usual
256x192 input that is (B, K, 64, 48). Module names follow torchvision's ResNet and the official
HRNet code, so ImageNet checkpoints load without renaming (see load_pretrained_backbone).

Parameter counts with 17 joints (pinned by tests/test_pose_models.py):

    simplebaseline_res18         15,376,721
    simplebaseline_res50         33,999,697   (paper: 34.0 M)
    simplebaseline_res101        52,991,825   (paper: 53.0 M)
    simplebaseline_res152        68,635,473   (paper: 68.6 M)
    hrnet_w32                    28,536,113   (paper: 28.5 M)
    hrnet_w48                    63,595,745   (paper: 63.6 M)
    simplebaseline_res18_small      965,729
    hrnet_w8_small                  719,321
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "Bottleneck",
    "HRNet",
    "HighResolutionModule",
    "SimpleBaseline",
    "build_model",
    "load_pretrained_backbone",
]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a shortcut, (B, C_in, H, W) -> (B, planes, H/s, W/s).

    Attribute names are torchvision's (conv1, bn1, conv2, bn2, downsample).
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 with the stride, 1x1), (B, C_in, H, W) -> (B, 4 planes, H/s, W/s).

    The stride sits on the 3x3 conv, as in torchvision ("ResNet v1.5") and both official pose
    codes. Attribute names are torchvision's (conv1..3, bn1..3, downsample).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


ResidualBlock = type[BasicBlock] | type[Bottleneck]


def _residual_layer(block: ResidualBlock, in_channels: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """`blocks` residual blocks; the first one changes width and stride through a 1x1 conv + BN
    shortcut (named downsample.0 / downsample.1 as in torchvision) when either changes."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    layers = [block(in_channels, planes, stride, downsample)]
    layers += [block(out_channels, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# depth -> (block, blocks per stage), as in torchvision and the SimpleBaseline code.
_RESNET_LAYOUTS: dict[int, tuple[ResidualBlock, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class SimpleBaseline(nn.Module):
    """SimpleBaseline (Xiao, Wu and Wei, ECCV 2018): a ResNet and a stack of deconvolutions.

    Shapes: images (B, 3, H, W) -> heatmaps (B, num_joints, H * 2**deconv_layers / 32,
    W * 2**deconv_layers / 32); with the default 3 deconvolutions that is stride 4, e.g.
    (B, 3, 256, 192) -> (B, 17, 64, 48). H and W must be multiples of 32.

    Args:
        depth: ResNet depth, 18 or 34 (BasicBlock) or 50, 101, 152 (Bottleneck).
        num_joints: K, the number of heatmaps.
        width: stem width; the four stages have width, 2, 4 and 8 times width channels (times 4
            at a bottleneck's output). 64 is the standard ResNet.
        deconv_channels: channels of every deconvolution.
        deconv_layers: number of ConvTranspose2d(4, stride 2, padding 1) + BN + ReLU layers, each
            doubling the resolution.

    Module names: conv1, bn1, layer1..layer4 (with layerN.M.downsample.0/1) are the keys of
    torchvision's ResNet state dict, so an ImageNet ResNet checkpoint loads as it is (its fc.* is
    unused); the head is deconv_layers.* and final_layer.*, as in the official code.

    Initialisation: the backbone as torchvision's ResNet (Kaiming normal, fan_out); the head as the
    paper's code: deconvolutions and final conv normal(std=0.001), final bias 0; every BN weight
    1 and bias 0.

    Parameters with 17 joints: depth 18: 15.38 M, 50: 34.00 M, 101: 52.99 M, 152: 68.64 M;
    depth 18, width 16, 64 deconv channels: 0.97 M.
    """

    def __init__(
        self,
        depth: int = 50,
        num_joints: int = 17,
        width: int = 64,
        deconv_channels: int = 256,
        deconv_layers: int = 3,
    ) -> None:
        super().__init__()
        if depth not in _RESNET_LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(_RESNET_LAYOUTS)}, got {depth!r}")
        _check_positive(num_joints=num_joints, width=width, deconv_channels=deconv_channels)
        if not isinstance(deconv_layers, int) or deconv_layers < 0:
            raise ValueError(f"deconv_layers must be a non-negative int, got {deconv_layers!r}")
        block, blocks_per_stage = _RESNET_LAYOUTS[depth]

        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        stages = []
        for index, blocks in enumerate(blocks_per_stage):
            planes = width * 2**index
            stages.append(_residual_layer(block, channels, planes, blocks, stride=1 if index == 0 else 2))
            channels = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        deconvs: list[nn.Module] = []
        for _ in range(deconv_layers):
            deconvs += [
                nn.ConvTranspose2d(channels, deconv_channels, 4, 2, 1, output_padding=0, bias=False),
                nn.BatchNorm2d(deconv_channels),
                nn.ReLU(inplace=True),
            ]
            channels = deconv_channels
        self.deconv_layers = nn.Sequential(*deconvs)
        self.final_layer = nn.Conv2d(channels, num_joints, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=0.001)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.final_layer.weight, std=0.001)
        nn.init.zeros_(self.final_layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, K, H/4, W/4) heatmaps (with 3 deconvolutions)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.final_layer(self.deconv_layers(x))


class HighResolutionModule(nn.Module):
    """One HRNet module: parallel branches of BasicBlocks, then multi-scale fusion.

    Takes a list of n feature maps, branch i of shape (B, channels[i], H / 2**i, W / 2**i), and
    returns the fused list of the same shapes (only the first, highest-resolution one when
    multi_scale_output is False). Fusion into branch i sums, over all branches j:
    j < i: (i - j) strided 3x3 convs + BN (ReLU between successive ones); j == i: the map itself;
    j > i: 1x1 conv + BN, then nearest upsampling by 2**(j - i); then a ReLU.

    Module names follow the official code: branches.i.m.*, fuse_layers.i.j.*.
    """

    def __init__(self, channels: Sequence[int], blocks: int, multi_scale_output: bool = True) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"a high-resolution module needs at least 2 branches, got {len(channels)}")
        self.branches = nn.ModuleList(_residual_layer(BasicBlock, width, width, blocks) for width in channels)
        outputs = len(channels) if multi_scale_output else 1
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse_layer(channels, source, target) for source in range(len(channels)))
            for target in range(outputs)
        )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _fuse_layer(channels: Sequence[int], source: int, target: int) -> nn.Module:
        if source > target:
            return nn.Sequential(
                nn.Conv2d(channels[source], channels[target], 1, bias=False),
                nn.BatchNorm2d(channels[target]),
                nn.Upsample(scale_factor=2 ** (source - target), mode="nearest"),
            )
        if source == target:
            # Identity has no parameters, so the state dict keys stay those of the official code,
            # which puts None here.
            return nn.Identity()
        steps = []
        for step in range(target - source):
            last = step == target - source - 1
            out_channels = channels[target] if last else channels[source]
            layers: list[nn.Module] = [
                nn.Conv2d(channels[source], out_channels, 3, 2, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            ]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            steps.append(nn.Sequential(*layers))
        return nn.Sequential(*steps)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        features = [branch(x) for branch, x in zip(self.branches, features, strict=True)]
        fused = []
        for fuse_layer in self.fuse_layers:
            total = fuse_layer[0](features[0])
            for layer, x in zip(fuse_layer[1:], features[1:]):
                total = total + layer(x)
            fused.append(self.relu(total))
        return fused


def _transition_layer(previous: Sequence[int], current: Sequence[int]) -> nn.ModuleList:
    """The official HRNet transition from branches of widths `previous` to `current`.

    An existing branch i gets a 3x3 conv + BN + ReLU when its width changes (Identity otherwise);
    a new branch is made from the lowest-resolution previous branch by strided 3x3 conv + BN + ReLU
    steps, one per halving, keeping that branch's width until the last step.
    """
    layers: list[nn.Module] = []
    for index, out_channels in enumerate(current):
        if index < len(previous):
            if previous[index] == out_channels:
                layers.append(nn.Identity())
            else:
                layers.append(
                    nn.Sequential(
                        nn.Conv2d(previous[index], out_channels, 3, 1, 1, bias=False),
                        nn.BatchNorm2d(out_channels),
                        nn.ReLU(inplace=True),
                    )
                )
            continue
        steps = []
        halvings = index + 1 - len(previous)
        for step in range(halvings):
            step_out = out_channels if step == halvings - 1 else previous[-1]
            steps.append(
                nn.Sequential(
                    nn.Conv2d(previous[-1], step_out, 3, 2, 1, bias=False),
                    nn.BatchNorm2d(step_out),
                    nn.ReLU(inplace=True),
                )
            )
        layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def _apply_transition(transition: nn.ModuleList, features: list[torch.Tensor]) -> list[torch.Tensor]:
    # New branches start from the lowest-resolution existing one, as in the official forward.
    return [layer(features[index] if index < len(features) else features[-1]) for index, layer in enumerate(transition)]


class HRNet(nn.Module):
    """HRNet (Sun, Xiao, Liu and Wang, CVPR 2019) as in the official pose configuration.

    Shapes: images (B, 3, H, W) -> heatmaps (B, num_joints, H/4, W/4), e.g. (B, 3, 256, 192) ->
    (B, 17, 64, 48). H and W must be multiples of 32 (the fourth branch runs at stride 32).

    Layout: stem of two 3x3 stride-2 convs with 64 channels (conv1, bn1, conv2, bn2); layer1 of
    `stage1_blocks` Bottlenecks (64 -> 256 channels); stages 2, 3 and 4 (stage2..stage4) with 2, 3
    and 4 branches of widths width, 2, 4 and 8 times width, made of `stage_modules` high-resolution
    modules whose branches have `branch_blocks` BasicBlocks each; transition1..transition3 between
    them; the last module keeps only the highest-resolution output, which final_layer (1x1 conv
    with bias) turns into heatmaps. Module names are those of the official code, so the keys of
    its ImageNet checkpoints match (their classification head is unused).

    Initialisation as the official code: every conv normal(std=0.001) with bias 0, BN weight 1
    and bias 0.

    Args:
        width: width of the highest-resolution branch (32 for HRNet-W32, 48 for HRNet-W48).
        num_joints: K, the number of heatmaps.
        stage1_blocks: Bottlenecks in layer1 (4 in the paper).
        branch_blocks: BasicBlocks per branch in each module (4 in the paper).
        stage_modules: modules in stages 2, 3 and 4 (1, 4, 3 in the paper).

    Parameters with 17 joints: W32: 28.54 M, W48: 63.60 M; W8 with 1 Bottleneck in layer1 and one
    module per stage: 0.72 M.
    """

    def __init__(
        self,
        width: int = 32,
        num_joints: int = 17,
        *,
        stage1_blocks: int = 4,
        branch_blocks: int = 4,
        stage_modules: tuple[int, int, int] = (1, 4, 3),
    ) -> None:
        super().__init__()
        _check_positive(width=width, num_joints=num_joints, stage1_blocks=stage1_blocks, branch_blocks=branch_blocks)
        if len(stage_modules) != 3:
            raise ValueError(f"stage_modules needs one count for each of stages 2, 3 and 4, got {stage_modules!r}")
        _check_positive(**{f"stage{index + 2} modules": count for index, count in enumerate(stage_modules)})
        stem_channels = 64
        widths = [width * 2**index for index in range(4)]

        self.conv1 = nn.Conv2d(3, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.conv2 = nn.Conv2d(stem_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _residual_layer(Bottleneck, stem_channels, stem_channels, stage1_blocks)
        layer1_channels = stem_channels * Bottleneck.expansion

        self.transition1 = _transition_layer([layer1_channels], widths[:2])
        self.stage2 = self._stage(widths[:2], stage_modules[0], branch_blocks, multi_scale_output=True)
        self.transition2 = _transition_layer(widths[:2], widths[:3])
        self.stage3 = self._stage(widths[:3], stage_modules[1], branch_blocks, multi_scale_output=True)
        self.transition3 = _transition_layer(widths[:3], widths)
        self.stage4 = self._stage(widths, stage_modules[2], branch_blocks, multi_scale_output=False)
        self.final_layer = nn.Conv2d(widths[0], num_joints, 1)
        self._init_weights()

    @staticmethod
    def _stage(channels: Sequence[int], modules: int, blocks: int, multi_scale_output: bool) -> nn.Sequential:
        # Only the stage's last module may drop the lower-resolution outputs.
        return nn.Sequential(
            *(
                HighResolutionModule(channels, blocks, multi_scale_output or index < modules - 1)
                for index in range(modules)
            )
        )

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.001)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, K, H/4, W/4) heatmaps."""
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.relu(self.bn2(self.conv2(x)))
        features = [self.layer1(x)]
        for transition, stage in (
            (self.transition1, self.stage2),
            (self.transition2, self.stage3),
            (self.transition3, self.stage4),
        ):
            features = stage(_apply_transition(transition, features))
        return self.final_layer(features[0])


_MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "simplebaseline_res18": functools.partial(SimpleBaseline, depth=18),
    "simplebaseline_res50": functools.partial(SimpleBaseline, depth=50),
    "simplebaseline_res101": functools.partial(SimpleBaseline, depth=101),
    "simplebaseline_res152": functools.partial(SimpleBaseline, depth=152),
    "hrnet_w32": functools.partial(HRNet, width=32),
    "hrnet_w48": functools.partial(HRNet, width=48),
    # For training on a CPU in minutes: a quarter-width ResNet-18 and 64 deconvolution channels;
    # three deconvolutions keep the output stride at 4.
    "simplebaseline_res18_small": functools.partial(SimpleBaseline, depth=18, width=16, deconv_channels=64),
    # For training on a CPU in minutes: width 8; stages 3 and 4 cut from 4 and 3 modules to 1
    # each, and layer1 from 4 Bottlenecks to 1 (at 64 and 256 channels, stride 4, it would
    # otherwise take half the compute).
    "hrnet_w8_small": functools.partial(HRNet, width=8, stage1_blocks=1, stage_modules=(1, 1, 1)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_MODEL_FACTORIES)
"""Names accepted by build_model."""


def build_model(name: str, num_joints: int = 17) -> nn.Module:
    """A freshly initialised pose network by name (one of MODEL_NAMES) with `num_joints` heatmaps.

    Every model maps (B, 3, H, W) images to (B, num_joints, H/4, W/4) heatmaps. The "_small"
    variants are cut down for training on a CPU (see the module docstring for parameter counts).
    Raises ValueError for an unknown name.
    """
    if name not in _MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _MODEL_FACTORIES[name](num_joints=num_joints)


def _unwrap_state_dict(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a raw state dict or of one nested under "state_dict" or "model"."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(checkpoint).__name__}")
    for nested_key in ("state_dict", "model"):
        if isinstance(checkpoint.get(nested_key), Mapping):
            checkpoint = checkpoint[nested_key]
            break
    tensors = {str(key): value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors (keys: {list(checkpoint)[:5]})")
    return tensors


def _strip_prefixes(key: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_pretrained_backbone(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Load the weights of a local checkpoint that match `model` by name and shape.

    The file (read with torch.load(map_location="cpu", weights_only=True)) may hold a raw state
    dict or one nested under "state_dict" or "model". A leading "module." (DataParallel) is
    stripped from its keys, and for a SimpleBaseline then also "backbone." (mmpose). Keys the model
    lacks, such as an ImageNet classifier's fc.*, are skipped.

    Returns {"loaded": model keys loaded, "missing": model keys not loaded, "unexpected": file keys
    (as written in the file) not used}, each in state dict order.

    Raises ValueError when no key matches, naming the file and a few keys of each side, and when a
    key matches by name but not by shape, naming it with both shapes.
    """
    path = os.fspath(path)
    file_state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    prefixes = ("module.", "backbone.") if isinstance(model, SimpleBaseline) else ("module.",)
    model_state = model.state_dict()

    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for file_key, tensor in file_state.items():
        key = _strip_prefixes(file_key, prefixes)
        if key not in model_state or key in matched:
            unexpected.append(file_key)
        elif tensor.shape != model_state[key].shape:
            mismatched.append(f"{key} (file {tuple(tensor.shape)}, model {tuple(model_state[key].shape)})")
        else:
            matched[key] = tensor
    if mismatched:
        raise ValueError(f"{path}: shapes differ from the model's for {', '.join(mismatched)}")
    if not matched:
        raise ValueError(
            f"{path}: no key matches the model; the file has e.g. {list(file_state)[:5]}, "
            f"the model has e.g. {list(model_state)[:5]}"
        )
    model.load_state_dict(matched, strict=False)
    loaded = [key for key in model_state if key in matched]
    return {
        "loaded": loaded,
        "missing": [key for key in model_state if key not in matched],
        "unexpected": unexpected,
    }
