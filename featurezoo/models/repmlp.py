"""RepMLPNet, with MindCV's module tree and parameter names.

`RepMLPNet: Hierarchical Vision MLP with Re-parameterized Locality
<https://arxiv.org/abs/2112.11081>`_. Each :class:`RepMLPBlock` cuts its input
into ``h`` x ``w`` partitions and mixes every partition's pixels with a fully
connected layer (``fc3``, grouped into ``num_sharesets`` channel sets), while
training adds small convolutions (``repconv1``, ``repconv3``) on the same
partitions. :func:`locality_injection` folds those convolutions and the
BatchNorms into ``fc3`` (the deploy form, ``deploy=True``), computing the same
function.

Input sizes are fixed by the weights: ``fc3`` holds ``(h * w)^2`` weights per
channel set, so every stage's map must be a multiple of its partition
(``hs``/``ws``): ``repmlp_t224``/``repmlp_b224`` accept sides ``224k .. 224k+3``,
the ``*256`` variants ``256k .. 256k+3`` (the unpadded stride-4 and stride-2
embeddings round down, so ``227`` px gives the maps of ``224`` px).

MindCV also builds ``conv2d``, a patch-embedding conv it never calls; it is kept
so parameter names and counts match MindCV's checkpoints.

``feature_info``: the last unit of each stage (``stages.<i>.<last>``, strides 4,
8, 16, 32), before the downsampling embedding that follows it;
:meth:`RepMLPNet.forward_levels` is the classifier's own forward.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import SideRule, build_model_with_cfg, generate_default_cfgs
from ..features import take_levels
from ..registry import register_model

__all__ = ["RepMLPNet", "RepMLPBlock", "RepMLPNetUnit", "locality_injection"]

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def conv_bn(in_channels: int, out_channels: int, kernel_size, stride, padding: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(out_channels)),
    ]))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size, stride, padding: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", conv_bn(in_channels, out_channels, kernel_size, stride, padding)),
        ("relu", nn.ReLU()),
    ]))


def _fuse_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a bias-free conv/fc followed by ``bn``, in float64; a BN channel may
    cover several consecutive output channels (``fc3``: one BN channel per ``h * w`` outputs)."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    t = bn.weight.double() / std
    bias = bn.bias.double() - bn.running_mean.double() * t
    repeat = weight.shape[0] // t.numel()
    t, bias = t.repeat_interleave(repeat), bias.repeat_interleave(repeat)
    return weight.double() * t.reshape(-1, *([1] * (weight.dim() - 1))), bias


class GlobalPerceptron(nn.Module):
    """Channel gate from the global average: 1x1 conv, ReLU, 1x1 conv, sigmoid."""

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, internal_neurons, 1, bias=True)
        self.fc2 = nn.Conv2d(internal_neurons, input_channels, 1, bias=True)
        self.relu = nn.ReLU()
        self.sigmoid = nn.Sigmoid()
        self.input_channels = input_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=(2, 3), keepdim=True)
        x = self.sigmoid(self.fc2(self.relu(self.fc1(x))))
        return x.view(-1, self.input_channels, 1, 1)


class RepMLPBlock(nn.Module):
    """Global perceptron x (partition FC ``fc3`` + BN, plus the local conv branches when not deployed).

    Args:
        in_channels, out_channels: must be equal.
        h, w: partition size; the input's sides must be multiples of them.
        reparam_conv_k: kernel sizes of the local conv branches (``None``: none).
        globalperceptron_reduce: hidden width divisor of the global perceptron.
        num_sharesets: channel sets sharing one FC (``fc3`` is grouped by them).
        deploy: build the folded form (``fc3`` with bias, no BN, no branches).
    """

    def __init__(self, in_channels: int, out_channels: int, h: int, w: int,
                 reparam_conv_k: Optional[Sequence[int]] = None, globalperceptron_reduce: int = 4,
                 num_sharesets: int = 1, deploy: bool = False):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(f"RepMLPBlock needs in_channels == out_channels, got {in_channels}, {out_channels}")
        self.C, self.O, self.S = in_channels, out_channels, num_sharesets
        self.h, self.w = h, w
        self.deploy = deploy
        self.gp = GlobalPerceptron(in_channels, in_channels // globalperceptron_reduce)
        hws = h * w * num_sharesets
        self.fc3 = nn.Conv2d(hws, hws, 1, bias=deploy, groups=num_sharesets)
        self.fc3_bn: nn.Module = nn.Identity() if deploy else nn.BatchNorm2d(num_sharesets)
        self.reparam_conv_k = tuple(reparam_conv_k) if reparam_conv_k is not None else None
        if not deploy and self.reparam_conv_k is not None:
            for k in self.reparam_conv_k:
                self.add_module(f"repconv{k}", conv_bn(num_sharesets, num_sharesets, k, 1, k // 2,
                                                       groups=num_sharesets))

    def _branches(self) -> List[nn.Module]:
        if self.deploy or self.reparam_conv_k is None:
            return []
        return [getattr(self, f"repconv{k}") for k in self.reparam_conv_k]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        global_vec = self.gp(inputs)
        origin_shape = inputs.shape
        if origin_shape[2] % self.h or origin_shape[3] % self.w:
            raise ValueError(
                f"RepMLPBlock: a {origin_shape[2]}x{origin_shape[3]} map cannot be cut into {self.h}x{self.w} "
                f"partitions; RepMLPNet takes only input sizes whose stage maps are multiples of its hs/ws "
                f"(224k..224k+3 px for the *224 models, 256k..256k+3 px for the *256 ones)"
            )
        h_parts, w_parts = origin_shape[2] // self.h, origin_shape[3] // self.w
        # Partitions: N, h_parts, w_parts, C, h, w.
        partitions = inputs.reshape(-1, self.C, h_parts, self.h, w_parts, self.w).permute(0, 2, 4, 1, 3, 5)
        # Channel perceptron: fc3 over each channel set's h*w pixels. These reshapes regroup
        # (partition, channel) rows exactly as MindCV's do.
        fc3_out = self.fc3(partitions.reshape(-1, self.S * self.h * self.w, 1, 1))
        fc3_out = self.fc3_bn(fc3_out.reshape(-1, self.S, self.h, self.w))
        fc3_out = fc3_out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)
        # Local perceptron.
        branches = self._branches()
        if branches:
            conv_inputs = partitions.reshape(-1, self.S, self.h, self.w)
            conv_out = 0
            for branch in branches:
                conv_out = conv_out + branch(conv_inputs)
            fc3_out = fc3_out + conv_out.reshape(-1, h_parts, w_parts, self.S, self.h, self.w)
        out = fc3_out.permute(0, 3, 1, 4, 2, 5).reshape(origin_shape)  # N, O, h_parts, h, w_parts, w
        return out * global_vec

    def get_equivalent_fc3(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) in float64 of the single ``fc3`` computing fc3 + BN + local conv branches."""
        if self.deploy:
            raise RuntimeError("RepMLPBlock is already deployed: its fc3 is the folded one")
        fc_weight, fc_bias = _fuse_bn(self.fc3.weight, self.fc3_bn)
        branches = self._branches()
        if not branches:
            return fc_weight, fc_bias
        largest = max(self.reparam_conv_k)
        total_kernel, total_bias = 0, 0
        for k, branch in zip(self.reparam_conv_k, branches):
            kernel, bias = _fuse_bn(branch.conv.weight, branch.bn)
            total_kernel = total_kernel + F.pad(kernel, [(largest - k) // 2] * 4)
            total_bias = total_bias + bias
        rep_weight, rep_bias = self._convert_conv_to_fc(total_kernel, total_bias)
        return rep_weight.reshape_as(fc_weight) + fc_weight, rep_bias + fc_bias

    def _convert_conv_to_fc(self, kernel: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The grouped FC equal to a grouped conv on h x w partitions: the conv's responses to unit impulses."""
        hw = self.h * self.w
        impulses = torch.eye(hw, dtype=kernel.dtype, device=kernel.device).repeat(1, self.S)
        responses = F.conv2d(impulses.reshape(hw, self.S, self.h, self.w), kernel,
                             padding=(kernel.shape[2] // 2, kernel.shape[3] // 2), groups=self.S)
        return responses.reshape(hw, self.S * hw).t(), bias.repeat_interleave(hw)

    def local_inject(self) -> None:
        """Fold BN and the local conv branches into ``fc3`` in place (a no-op when already deployed)."""
        if self.deploy:
            return
        with torch.no_grad():
            weight, bias = self.get_equivalent_fc3()
            old = self.fc3
            fc3 = nn.Conv2d(old.in_channels, old.out_channels, 1, bias=True, groups=self.S,
                            device=old.weight.device, dtype=old.weight.dtype)
            fc3.weight.copy_(weight)
            fc3.bias.copy_(bias)
        fc3.train(self.training)
        for k in self.reparam_conv_k or ():
            delattr(self, f"repconv{k}")
        self.fc3 = fc3
        self.fc3_bn = nn.Identity()
        self.deploy = True

    def reparameterize(self) -> None:
        """The inference path's hook (:func:`featurezoo.optimize_for_inference`): :meth:`local_inject`."""
        self.local_inject()


class FFNBlock(nn.Module):
    """1x1 conv + BN, GELU (tanh, MindSpore's default), 1x1 conv + BN."""

    def __init__(self, in_channels: int, hidden_channels: Optional[int] = None, out_channels: Optional[int] = None):
        super().__init__()
        out_features = out_channels or in_channels
        hidden_features = hidden_channels or in_channels
        self.ffn_fc1 = conv_bn(in_channels, hidden_features, 1, 1, 0)
        self.ffn_fc2 = conv_bn(hidden_features, out_features, 1, 1, 0)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Module):
    """Pre-BN residual RepMLP block, then pre-BN residual FFN."""

    def __init__(self, channels: int, h: int, w: int, reparam_conv_k: Optional[Sequence[int]],
                 globalperceptron_reduce: int, ffn_expand: int = 4, num_sharesets: int = 1, deploy: bool = False):
        super().__init__()
        self.repmlp_block = RepMLPBlock(channels, channels, h, w, reparam_conv_k, globalperceptron_reduce,
                                        num_sharesets, deploy)
        self.ffn_block = FFNBlock(channels, channels * ffn_expand)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.repmlp_block(self.prebn1(x))
        return y + self.ffn_block(self.prebn2(y))


def locality_injection(model: _ModuleT) -> _ModuleT:
    """Deploy every :class:`RepMLPBlock` of ``model`` (a classifier or a feature model) in place.

    The deployed model computes what ``model`` computed in eval mode (the fold
    uses the BatchNorms' running statistics); its ``state_dict`` loads into
    ``create_model(name, deploy=True)``.
    """
    blocks = [m for m in model.modules() if isinstance(m, RepMLPBlock)]
    if not blocks:
        raise ValueError(f"locality_injection: {type(model).__name__} holds no RepMLPBlock")
    for block in blocks:
        block.local_inject()
    return model


class RepMLPNet(nn.Module):
    """RepMLPNet classifier.

    Args:
        in_channels, num_classes: input channels, classifier outputs.
        patch_size: kernel and stride of the patch embedding.
        num_blocks: units per stage.
        channels: channels per stage.
        hs, ws: partition size per stage (the stage's map size at the design resolution).
        sharesets_nums: channel sets per stage.
        reparam_conv_k: kernel sizes of the local conv branches.
        globalperceptron_reduce: hidden width divisor of the global perceptrons.
        deploy: build the folded form (see :func:`locality_injection`).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, patch_size: Tuple[int, int] = (4, 4),
                 num_blocks: Sequence[int] = (2, 2, 6, 2), channels: Sequence[int] = (192, 384, 768, 1536),
                 hs: Sequence[int] = (64, 32, 16, 8), ws: Sequence[int] = (64, 32, 16, 8),
                 sharesets_nums: Sequence[int] = (4, 8, 16, 32), reparam_conv_k: Optional[Sequence[int]] = (3,),
                 globalperceptron_reduce: int = 4, deploy: bool = False):
        super().__init__()
        num_stages = len(num_blocks)
        if not num_stages == len(channels) == len(hs) == len(ws) == len(sharesets_nums):
            raise ValueError("num_blocks, channels, hs, ws and sharesets_nums need one entry per stage")
        self.deploy = deploy
        self.conv_embedding = conv_bn_relu(in_channels, channels[0], patch_size, patch_size, 0)
        self.conv2d = nn.Conv2d(in_channels, channels[0], patch_size, patch_size, bias=False)  # unused, as MindCV

        reduction = patch_size[0]
        self.feature_info = []
        stages, embeds = [], []
        for i in range(num_stages):
            stages.append(nn.ModuleList([
                RepMLPNetUnit(channels[i], hs[i], ws[i], reparam_conv_k, globalperceptron_reduce, ffn_expand=4,
                              num_sharesets=sharesets_nums[i], deploy=deploy)
                for _ in range(num_blocks[i])]))
            self.feature_info.append(dict(chs=channels[i], reduction=reduction, name=f"stages.{i}.{num_blocks[i] - 1}"))
            if i < num_stages - 1:
                embeds.append(conv_bn_relu(channels[i], channels[i + 1], 2, 2, 0))
                reduction *= 2
        self.stages = nn.ModuleList(stages)
        self.embeds = nn.ModuleList(embeds)
        self.num_features = channels[-1]
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_classes)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # MindCV: U(-k, k), k = 1/sqrt(fan_in), for conv and dense weights and biases.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = 1 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -bound, bound)

    def locality_injection(self) -> "RepMLPNet":
        """Fold every block into its deploy form, in place (see :func:`locality_injection`)."""
        locality_injection(self)
        self.deploy = True
        return self

    def forward_levels(self, x: torch.Tensor, indices: Sequence[int]) -> List[torch.Tensor]:
        """The ``feature_info`` entries ``indices`` (ascending), computing nothing past the deepest one."""
        take, deepest = take_levels(indices, len(self.feature_info))
        out = []
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            for unit in stage:
                x = unit(x)
            if i in take:
                out.append(x)
            if i == deepest:
                break
            x = self.embeds[i](x)
        return out

    def prune_levels(self, indices: Sequence[int]) -> None:
        """Delete the unused ``conv2d``, the head and every stage after the deepest feature in ``indices``."""
        _, deepest = take_levels(indices, len(self.feature_info))
        for name in ("conv2d", "head_norm", "head"):
            delattr(self, name)
        del self.stages[deepest + 1:]
        del self.embeds[deepest:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x, [len(self.stages) - 1])[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_norm(x).mean(dim=(2, 3))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_repmlp(variant: str, pretrained: bool = False, **kwargs) -> RepMLPNet:
    return build_model_with_cfg(RepMLPNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", side: int = 224, **kwargs):
    # MindCV names "classifier", a module RepMLPNet does not have; ours names the real head.
    return dict(url=url, num_classes=1000, first_conv="conv_embedding.conv.conv", classifier="head_norm,head",
                fixed_input_size=True, input_sides=(side, 2 * side), side_rules=(SideRule(side, (0, 1, 2, 3), minimum=side),),
                size_note=f"fc3 weights fix the partition: sides {side}k..{side}k+3 px only", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "repmlp_t224": _cfg(f"{_MS}/repmlp/repmlp_t224-8dbedd00.ckpt"),
    "repmlp_t256": _cfg(side=256, input_size=(3, 256, 256)),
    "repmlp_b224": _cfg(),
    "repmlp_b256": _cfg(side=256, input_size=(3, 256, 256)),
    "repmlp_d256": _cfg(side=256, input_size=(3, 256, 256)),
    "repmlp_l256": _cfg(side=256, input_size=(3, 256, 256)),
})

_RES224 = dict(hs=(56, 28, 14, 7), ws=(56, 28, 14, 7))
_RES256 = dict(hs=(64, 32, 16, 8), ws=(64, 32, 16, 8))


@register_model
def repmlp_t224(pretrained: bool = False, **kwargs) -> RepMLPNet:
    return _create_repmlp("repmlp_t224", pretrained, channels=(64, 128, 256, 512), num_blocks=(2, 2, 6, 2),
                          reparam_conv_k=(1, 3), sharesets_nums=(1, 4, 16, 128), **_RES224, **kwargs)


@register_model
def repmlp_t256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    return _create_repmlp("repmlp_t256", pretrained, channels=(64, 128, 256, 512), num_blocks=(2, 2, 6, 2),
                          reparam_conv_k=(1, 3), sharesets_nums=(1, 4, 16, 128), **_RES256, **kwargs)


@register_model
def repmlp_b224(pretrained: bool = False, **kwargs) -> RepMLPNet:
    return _create_repmlp("repmlp_b224", pretrained, channels=(96, 192, 384, 768), num_blocks=(2, 2, 12, 2),
                          reparam_conv_k=(1, 3), sharesets_nums=(1, 4, 32, 128), **_RES224, **kwargs)


@register_model
def repmlp_b256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    return _create_repmlp("repmlp_b256", pretrained, channels=(96, 192, 384, 768), num_blocks=(2, 2, 12, 2),
                          reparam_conv_k=(1, 3), sharesets_nums=(1, 4, 32, 128), **_RES256, **kwargs)


@register_model
def repmlp_d256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    return _create_repmlp("repmlp_d256", pretrained, channels=(80, 160, 320, 640), num_blocks=(2, 2, 18, 2),
                          reparam_conv_k=(1, 3), sharesets_nums=(1, 4, 16, 128), **_RES256, **kwargs)


@register_model
def repmlp_l256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    return _create_repmlp("repmlp_l256", pretrained, channels=(96, 192, 384, 768), num_blocks=(2, 2, 18, 2),
                          reparam_conv_k=(1, 3), sharesets_nums=(1, 4, 32, 256), **_RES256, **kwargs)
