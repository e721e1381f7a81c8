"""HRNet (classification variant, with incremental head), with MindCV's module tree and parameter names.

`Deep High-Resolution Representation Learning for Visual Recognition <https://arxiv.org/abs/1908.07919>`_.

A stem reduces the input 4x, ``layer1`` (bottlenecks) runs at that resolution,
then ``stage2``..``stage4`` keep 2, 3 and 4 parallel branches (each new branch
at half the resolution of the previous one, created by ``transition1``..``3``)
and exchange information between them after every :class:`HRModule`. The
classifier head lifts each final branch with one bottleneck
(``incre_modules``), merges them from fine to coarse (``downsample_modules``),
then ``final_layer``, pooling and ``classifier``.

Features are MindCV's ``HRNetFeatures``: the stem (stride 2) and the four
final branches after their ``incre_modules`` bottleneck (strides 4..32). They
come from :meth:`HRNet.forward_levels`, which runs the classifier's own
code and stops as early as the requested outputs allow.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..layers import GlobalAvgPooling
from ..layers.helpers import total_stride
from ..registry import register_model
from .resnet import BasicBlock, Bottleneck

__all__ = ["HRNet", "HRModule"]

Block = Type[Union[BasicBlock, Bottleneck]]
BLOCKS: Dict[str, Block] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}
# Bottleneck widths of the incremental head, one per branch (MindCV's fixed values).
HEAD_CHANNELS = (32, 64, 128, 256)
HEAD_FEATURES = 2048


def _conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, relu: bool = False) -> nn.Sequential:
    # MindCV's 3x3 convs use pad_mode="pad", padding=1; its 1x1 convs are "same" at stride 1, i.e. unpadded.
    layers: List[nn.Module] = [
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _make_layer(block: Block, in_chs: int, channels: int, num_blocks: int, stride: int = 1) -> nn.Sequential:
    out_chs = channels * block.expansion
    down_sample = None
    if stride != 1 or in_chs != out_chs:
        down_sample = _conv_bn(in_chs, out_chs, 1, stride)
    blocks: List[nn.Module] = [block(in_chs, channels, stride, down_sample=down_sample)]
    blocks += [block(out_chs, channels) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class HRModule(nn.Module):
    """Parallel branches followed by the exchange unit that fuses every branch into each output.

    ``fuse_layers[i][j]`` brings branch ``j`` to branch ``i``'s resolution and
    width: a 1x1 conv then nearest upsampling when ``j > i``, a chain of strided
    3x3 convs when ``j < i``, identity when ``j == i``. The module outputs one
    map per entry of ``fuse_layers``: a feature model that needs fewer branches
    out of the last module shortens that list (see :meth:`HRNet.prune_levels`).

    ``fp16_upsample``: MindCV casts each upsampled term to float16 before adding
    it (``HRModule.construct``), so its outputs move in float16 steps; ``True``
    reproduces its numbers, ``False`` adds in full precision (the paper, timm).
    """

    def __init__(self, num_branches: int, block: Block, num_blocks: Sequence[int], num_inchannels: Sequence[int],
                 num_channels: Sequence[int], multi_scale_output: bool = True, fp16_upsample: bool = True):
        super().__init__()
        for what, values in (("num_blocks", num_blocks), ("num_inchannels", num_inchannels),
                             ("num_channels", num_channels)):
            if len(values) != num_branches:
                raise ValueError(f"HRModule: {num_branches} branches but {what} has {len(values)} entries: {values}")
        self.num_branches = num_branches
        self.multi_scale_output = multi_scale_output
        self.fp16_upsample = fp16_upsample
        self.branches = nn.ModuleList(
            _make_layer(block, num_inchannels[i], num_channels[i], num_blocks[i]) for i in range(num_branches)
        )
        self.num_inchannels = [c * block.expansion for c in num_channels]
        self.fuse_layers = self._make_fuse_layers() if num_branches > 1 else None
        self.relu = nn.ReLU()

    def _make_fuse_layers(self) -> nn.ModuleList:
        chs = self.num_inchannels
        fuse_layers = nn.ModuleList()
        for i in range(self.num_branches if self.multi_scale_output else 1):
            fuse = nn.ModuleList()
            for j in range(self.num_branches):
                if j > i:
                    fuse.append(_conv_bn(chs[j], chs[i], 1))
                elif j == i:
                    fuse.append(nn.Identity())
                else:
                    # i - j stride-2 convs; only the last one changes the width, and it has no ReLU.
                    steps = i - j
                    fuse.append(nn.Sequential(*(
                        _conv_bn(chs[j], chs[i] if k == steps - 1 else chs[j], 3, stride=2, relu=k < steps - 1)
                        for k in range(steps)
                    )))
            fuse_layers.append(fuse)
        return fuse_layers

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        if self.fuse_layers is None:
            return x
        out = []
        for i, fuse in enumerate(self.fuse_layers):
            y = x[0] if i == 0 else fuse[0](x[0])
            for j in range(1, self.num_branches):
                if j == i:
                    y = y + x[j]
                elif j > i:
                    up = F.interpolate(fuse[j](x[j]), size=x[i].shape[-2:], mode="nearest")
                    if self.fp16_upsample:
                        up = up.to(torch.float16).to(y.dtype)
                    y = y + up
                else:
                    y = y + fuse[j](x[j])
            out.append(self.relu(y))
        return out


class HRNet(nn.Module):
    """HRNet classifier; ``feature_info``: MindCV's ``HRNetFeatures`` outputs.

    Args:
        stage_cfg: ``{"stage1": ..., "stage4": ...}``, each a dict with
            ``num_modules``, ``num_branches``, ``block`` (``"BASIC"`` or
            ``"BOTTLENECK"``), ``num_blocks`` and ``num_channels`` (one per
            branch), as in MindCV.
        num_classes, in_channels: classifier outputs, input channels.
        fp16_upsample: round upsampled terms of the fusions to float16 as MindCV
            does (see :class:`HRModule`); ``False`` for full precision.

    Feature entries (MindCV's labels): ``stem`` (stride 2, before ``conv2``)
    and ``stage1``..``stage4``, the final branch ``k - 1`` after
    ``incre_modules[k - 1]`` (stride ``2 ** (k + 1)``). ``stage1`` names
    branch 0, which ``layer1`` (HRNet's first stage) creates; branch ``k - 1``
    is created by ``stage<k>``. Every feature except ``stem`` needs all of
    ``stage4``, as every final branch fuses all branches.
    """

    blocks_dict = BLOCKS

    def __init__(self, stage_cfg: Mapping[str, Mapping], num_classes: int = 1000, in_channels: int = 3,
                 fp16_upsample: bool = True):
        super().__init__()
        self.stage_cfg = stage_cfg
        self.fp16_upsample = fp16_upsample
        stem_chs = 64
        self.conv1 = nn.Conv2d(in_channels, stem_chs, 3, 2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.conv2 = nn.Conv2d(stem_chs, stem_chs, 3, 2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_chs)
        self.relu = nn.ReLU()
        self.feature_info = [dict(chs=stem_chs, reduction=self.conv1.stride[0], name="stem")]
        reductions = [total_stride(self.conv1, self.conv2)]  # one per branch

        self.stage1_cfg = stage_cfg["stage1"]
        block = BLOCKS[self.stage1_cfg["block"]]
        self.layer1 = _make_layer(block, stem_chs, self.stage1_cfg["num_channels"][0],
                                  self.stage1_cfg["num_blocks"][0])
        pre_stage_channels = [self.stage1_cfg["num_channels"][0] * block.expansion]

        for s in (2, 3, 4):
            cfg = stage_cfg[f"stage{s}"]
            setattr(self, f"stage{s}_cfg", cfg)
            expansion = BLOCKS[cfg["block"]].expansion
            num_channels = [c * expansion for c in cfg["num_channels"]]
            transition, flags = self._make_transition_layer(pre_stage_channels, num_channels)
            # New branches grow from the coarsest existing one.
            reductions += [reductions[-1] * total_stride(transition[i]) for i in range(len(reductions), len(flags))]
            self.add_module(f"transition{s - 1}", transition)
            setattr(self, f"transition{s - 1}_flags", flags)
            stage, pre_stage_channels = self._make_stage(cfg, num_channels)
            self.add_module(f"stage{s}", stage)

        self.pool = GlobalAvgPooling()
        self.incre_modules = nn.ModuleList()
        self.downsample_modules = nn.ModuleList()
        for i, (chs, reduction) in enumerate(zip(pre_stage_channels, reductions)):
            self.incre_modules.append(_make_layer(Bottleneck, chs, HEAD_CHANNELS[i], 1))
            head_chs = HEAD_CHANNELS[i] * Bottleneck.expansion
            self.feature_info.append(dict(chs=head_chs, reduction=reduction, name=f"stage{i + 1}"))
            if i > 0:
                self.downsample_modules.append(_conv_bn(prev_head_chs, head_chs, 3, stride=2, relu=True))
            prev_head_chs = head_chs
        self.final_layer = _conv_bn(prev_head_chs, HEAD_FEATURES, 1, relu=True)
        self.num_features = HEAD_FEATURES
        self.classifier = nn.Linear(HEAD_FEATURES, num_classes)

    @staticmethod
    def _make_transition_layer(pre_chs: Sequence[int], cur_chs: Sequence[int]) -> Tuple[nn.ModuleList, List[bool]]:
        layers, flags = nn.ModuleList(), []
        for i, chs in enumerate(cur_chs):
            if i < len(pre_chs):
                changed = chs != pre_chs[i]
                layers.append(_conv_bn(pre_chs[i], chs, 3, relu=True) if changed else nn.Identity())
                flags.append(changed)
            else:
                # A new branch: stride-2 convs from the coarsest existing branch.
                steps = i + 1 - len(pre_chs)
                layers.append(nn.Sequential(*(
                    _conv_bn(pre_chs[-1], chs if k == steps - 1 else pre_chs[-1], 3, stride=2, relu=True)
                    for k in range(steps)
                )))
                flags.append(True)
        return layers, flags

    def _make_stage(self, cfg: Mapping, num_inchannels: List[int]) -> Tuple[nn.Sequential, List[int]]:
        modules = []
        for _ in range(cfg["num_modules"]):
            modules.append(HRModule(cfg["num_branches"], BLOCKS[cfg["block"]], cfg["num_blocks"],
                                    num_inchannels, cfg["num_channels"], fp16_upsample=self.fp16_upsample))
            num_inchannels = modules[-1].num_inchannels
        return nn.Sequential(*modules), num_inchannels

    # -- forward ------------------------------------------------------------------------
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-2 stem: the ``stem`` feature."""
        return self.relu(self.bn1(self.conv1(x)))

    def _branches(self, x: torch.Tensor) -> List[torch.Tensor]:
        """From the ``stem`` feature to ``stage4``'s branches (as many as its last module fuses)."""
        x = self.layer1(self.relu(self.bn2(self.conv2(x))))
        y = [x]
        for s in (1, 2, 3):
            transition, flags = getattr(self, f"transition{s}"), getattr(self, f"transition{s}_flags")
            # Existing branches pass through (or adapt their width); a new one grows from the coarsest.
            xs = [t(y[min(i, len(y) - 1)]) if flag else y[i] for i, (t, flag) in enumerate(zip(transition, flags))]
            y = getattr(self, f"stage{s + 1}")(xs)
        return y

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four final branches, finest first (MindCV's ``forward_features``)."""
        return self._branches(self._stem(x))

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        x = self._stem(x)
        out = [x] if 0 in take else []
        if deepest > 0:
            branches = self._branches(x)
            out += [self.incre_modules[i - 1](branches[i - 1]) for i in sorted(take) if i > 0]
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete what the features ``indices`` do not need: the classifier head always; everything after
        the stem for ``[0]``; otherwise the unused ``incre_modules`` and the last module's fusions into
        branches past the deepest one requested."""
        take, deepest = take_levels(indices, len(self.feature_info))
        for name in ("downsample_modules", "final_layer", "pool", "classifier"):
            delattr(self, name)
        if deepest == 0:
            for name in ("conv2", "bn2", "layer1", "transition1", "stage2", "transition2", "stage3",
                         "transition3", "stage4", "incre_modules"):
                delattr(self, name)
            return
        # None keeps the ModuleList's positions (branch i <-> incre_modules[i]) and holds nothing.
        for i in range(len(self.incre_modules)):
            if i + 1 not in take:
                self.incre_modules[i] = None
        del self.stage4[-1].fuse_layers[deepest:]

    def forward_head(self, x: List[torch.Tensor]) -> torch.Tensor:
        y = self.incre_modules[0](x[0])
        for i, down in enumerate(self.downsample_modules, 1):
            y = self.incre_modules[i](x[i]) + down(y)
        return self.classifier(self.pool(self.final_layer(y)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _stage_cfg(width: int) -> Dict[str, Dict]:
    """MindCV's stage layout of ``hrnet_w<width>``: branch ``i`` has ``width * 2**i`` channels."""
    cfg = {"stage1": dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=[4], num_channels=[64])}
    for s, num_modules in ((2, 1), (3, 4), (4, 3)):
        cfg[f"stage{s}"] = dict(num_modules=num_modules, num_branches=s, block="BASIC", num_blocks=[4] * s,
                                num_channels=[width * 2 ** i for i in range(s)])
    return cfg


def _create_hrnet(variant: str, pretrained: bool = False, **kwargs) -> HRNet:
    return build_model_with_cfg(HRNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    # Every level leaves through the last stage's fusion and the increment heads, so frozen_stages
    # counts HRNet's own stages (mmdetection's HRNet meaning): the stem, layer1, then each transition + stage.
    return dict(url=url, num_classes=1000, first_conv="conv1", classifier="classifier",
                stage_modules=("conv1,bn1,conv2,bn2", "layer1", "transition1,stage2", "transition2,stage3",
                               "transition3,stage4"), **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
# timm models with the same architecture and parameters. timm's hrnet_w32/hrnet_w48 give the head's
# downsample and final convs biases that MindCV's lack; hrnet_w48_ssld (head_conv_bias=False) does not, and
# timm has no such w32. The numbers differ: MindCV rounds every upsampled fusion term to float16
# (fp16_upsample=True, the default here); with fp16_upsample=False they agree at multiples of 32.
_TIMM_TWINS = {"hrnet_w48": "hrnet_w48_ssld"}

_TIMM_RENAMES = ((r"\.downsample\.", ".down_sample."), (r"^downsamp_modules\.", "downsample_modules."))


default_cfgs = generate_default_cfgs({
    "hrnet_w32": _cfg(f"{_MS}/hrnet/hrnet_w32-cc4fbd91.ckpt"),
    "hrnet_w48": _cfg(f"{_MS}/hrnet/hrnet_w48-2e3399cd.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


@register_model
def hrnet_w32(pretrained: bool = False, **kwargs) -> HRNet:
    return _create_hrnet("hrnet_w32", pretrained, stage_cfg=_stage_cfg(32), **kwargs)


@register_model
def hrnet_w48(pretrained: bool = False, **kwargs) -> HRNet:
    return _create_hrnet("hrnet_w48", pretrained, stage_cfg=_stage_cfg(48), **kwargs)
