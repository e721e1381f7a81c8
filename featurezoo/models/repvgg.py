"""RepVGG, with MindCV's module tree and parameter names, and its re-parameterisation.

`RepVGG: Making VGG-style ConvNets Great Again <https://arxiv.org/abs/2101.03697>`_.
While training, each block sums a 3x3 conv+BN, a 1x1 conv+BN and (where the
shape allows) a BN of the input; for inference the three branches fold into
one 3x3 conv with bias (``rbr_reparam``), a plain VGG-style network computing
the same function. Fold a trained model (or a feature model made from one) with
:func:`repvgg_model_convert`:

>>> import featurezoo as fz
>>> model = fz.create_model("repvgg_a0", features_only=True).eval()
>>> fast = repvgg_model_convert(model)          # a converted copy
>>> sorted(n for n, _ in fast.stage0.named_children())
['nonlinearity', 'rbr_reparam', 'se']

Its ``state_dict`` loads into ``create_model(name, deploy=True)``.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import build_model_with_cfg, generate_default_cfgs
from ..layers import GlobalAvgPooling
from ..layers.init import fan_out_normal, init_weights, lecun_uniform
from ..layers.squeeze_excite import SqueezeExcite
from ..registry import register_model

__all__ = ["RepVGG", "RepVGGBlock", "repvgg_model_convert"]

_logger = logging.getLogger(__name__)

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
             groups: int = 1) -> nn.Sequential:
    # MindCV's pad_mode="pad": symmetric padding, which PyTorch's own padding is.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class RepVGGBlock(nn.Module):
    """``relu(se(dense3x3(x) + conv1x1(x) + bn(x)))``, or ``relu(se(rbr_reparam(x)))`` once deployed.

    The identity branch ``rbr_identity`` (a BatchNorm) exists only when input
    and output shapes agree (same channels, stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, group: int = 1, deploy: bool = False, use_se: bool = False):
        super().__init__()
        if kernel_size != 3 or padding != 1:
            raise ValueError(f"RepVGGBlock needs kernel_size=3 and padding=1, got {kernel_size} and {padding}")
        self.deploy = deploy
        self.group = group
        self.in_channels = in_channels
        self.nonlinearity = nn.ReLU()
        self.se = SqueezeExcite(out_channels, rd_channels=out_channels // 16) if use_se else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                         groups=group, bias=True)
        else:
            self.rbr_reparam = None
            has_identity = out_channels == in_channels and stride == 1
            self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
            self.rbr_dense = _conv_bn(in_channels, out_channels, kernel_size, stride, padding, group)
            self.rbr_1x1 = _conv_bn(in_channels, out_channels, 1, stride, padding - kernel_size // 2, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(self.se(out))

    # -- re-parameterisation ---------------------------------------------------------
    def get_equivalent_kernel_bias(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and bias of one conv equal to the three branches (BatchNorms in eval mode).

        Differentiable in the branch parameters; ``dtype`` computes in another
        precision (the result keeps it).
        """
        if self.rbr_reparam is not None:
            raise RuntimeError("RepVGGBlock is already deployed: its kernel and bias are rbr_reparam's")
        k3, b3 = self._fuse_bn(self.rbr_dense[0].weight, self.rbr_dense[1], dtype)
        k1, b1 = self._fuse_bn(self.rbr_1x1[0].weight, self.rbr_1x1[1], dtype)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            kid, bid = self._fuse_bn(self._identity_kernel(k3), self.rbr_identity, dtype)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias

    def _identity_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """A (grouped) 3x3 kernel that copies each input channel to the same output channel."""
        in_per_group = self.in_channels // self.group
        kernel = torch.zeros(self.in_channels, in_per_group, 3, 3, dtype=like.dtype, device=like.device)
        channel = torch.arange(self.in_channels, device=like.device)
        kernel[channel, channel % in_per_group, 1, 1] = 1.0
        return kernel

    @staticmethod
    def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d,
                 dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
        dtype = dtype or kernel.dtype
        mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
        gamma, beta = bn.weight.to(dtype), bn.bias.to(dtype)
        scale = gamma / torch.sqrt(var + bn.eps)
        return kernel.to(dtype) * scale.reshape(-1, 1, 1, 1), beta - mean * scale

    def switch_to_deploy(self) -> None:
        """Replace the branches by ``rbr_reparam``, in place (a no-op when already deployed).

        The fold uses the BatchNorms' running statistics, so the deployed block
        equals the training-form block in eval mode.
        """
        if self.rbr_reparam is not None:
            return
        dense = self.rbr_dense[0]
        weight = dense.weight
        with torch.no_grad():
            # Folded in float64 and rounded once, so the deployed block matches to float32 precision.
            kernel, bias = self.get_equivalent_kernel_bias(dtype=torch.float64)
            reparam = nn.Conv2d(dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride,
                                dense.padding, dense.dilation, groups=dense.groups, bias=True,
                                device=weight.device, dtype=weight.dtype)
            reparam.weight.copy_(kernel)
            reparam.bias.copy_(bias)
        reparam.train(self.training)
        self.rbr_reparam = reparam
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.deploy = True

    def reparameterize(self) -> None:
        """The inference path's hook (:func:`featurezoo.optimize_for_inference`): :meth:`switch_to_deploy`."""
        self.switch_to_deploy()


class RepVGG(nn.Module):
    """RepVGG classifier; ``feature_info``: ``stage0`` (the stem block) and ``stage1``..``stage4``.

    Args:
        num_blocks: blocks in stages 1-4.
        num_classes, in_channels: classifier outputs, input channels.
        width_multiplier: width factor of each of the 4 stages (on 64, 128, 256, 512).
        override_group_map: conv groups by block number (the stem block is 0 and
            must stay dense; stage blocks count from 1).
        deploy: build the single-branch inference form (``rbr_reparam`` convs).
        use_se: squeeze-excitation after each block's convs.
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 1000, in_channels: int = 3,
                 width_multiplier: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 override_group_map: Optional[Mapping[int, int]] = None, deploy: bool = False,
                 use_se: bool = False):
        super().__init__()
        if len(width_multiplier) != 4 or len(num_blocks) != 4:
            raise ValueError(f"RepVGG needs 4 num_blocks and 4 width_multiplier values, got {list(num_blocks)} "
                             f"and {list(width_multiplier)}")
        self.deploy = deploy
        self.override_group_map: Dict[int, int] = dict(override_group_map or {})
        if 0 in self.override_group_map:
            raise ValueError("RepVGG: override_group_map must not group block 0 (the stem block)")
        self.use_se = use_se

        self.in_planes = min(64, int(64 * width_multiplier[0]))
        stride = reduction = 2  # the stem block's, and every stage's
        self.stage0 = RepVGGBlock(in_channels, self.in_planes, 3, stride=stride, padding=1, deploy=deploy,
                                  use_se=use_se)
        self.feature_info = [dict(chs=self.in_planes, reduction=reduction, name="stage0")]
        self.cur_layer_idx = 1
        for i, (base, depth, mult) in enumerate(zip((64, 128, 256, 512), num_blocks, width_multiplier)):
            self.add_module(f"stage{i + 1}", self._make_stage(int(base * mult), depth, stride=stride))
            reduction *= stride
            self.feature_info.append(dict(chs=self.in_planes, reduction=reduction, name=f"stage{i + 1}"))
        self.num_features = self.in_planes
        self.gap = GlobalAvgPooling()
        self.linear = nn.Linear(self.num_features, num_classes)
        init_weights(self, conv=fan_out_normal, linear=lecun_uniform)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            groups = self.override_group_map.get(self.cur_layer_idx, 1)
            blocks.append(RepVGGBlock(self.in_planes, planes, 3, stride=s, padding=1, group=groups,
                                      deploy=self.deploy, use_se=self.use_se))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def switch_to_deploy(self) -> "RepVGG":
        """Fold every block into its single-conv inference form, in place; returns ``self``."""
        return repvgg_model_convert(self, do_copy=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.gap(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def repvgg_model_convert(model: _ModuleT, save_path: Optional[str] = None, do_copy: bool = True) -> _ModuleT:
    """Fold every :class:`RepVGGBlock` of ``model`` into its single 3x3 conv (MindCV's ``repvgg_model_convert``).

    Works on a classifier and on a ``features_only`` model alike. The result
    computes what ``model`` computes in eval mode.

    Args:
        model: a module holding RepVGG blocks.
        save_path: also ``torch.save`` the converted ``state_dict`` there (it
            loads into ``create_model(name, deploy=True)``).
        do_copy: convert a deep copy and leave ``model`` untouched.
    """
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    if not blocks:
        raise ValueError(f"repvgg_model_convert: {type(model).__name__} holds no RepVGGBlock")
    if do_copy:
        model = copy.deepcopy(model)
        blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    for block in blocks:
        block.switch_to_deploy()
    _logger.debug("re-parameterised %d RepVGG blocks", len(blocks))
    if save_path is not None:
        torch.save(model.state_dict(), save_path)
    return model


def _create_repvgg(variant: str, pretrained: bool = False, **kwargs) -> RepVGG:
    return build_model_with_cfg(RepVGG, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, first_conv="stage0.rbr_dense.0", classifier="linear", **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv/repvgg"
# timm models with the same architecture and parameters (timm has no repvgg_b1g2). Both pad symmetrically:
# the numbers agree at any input size. Training form only (timm names no rbr_reparam).
_TIMM_TWINS = {n: n for n in ("repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b2",
                             "repvgg_b3", "repvgg_b1g4", "repvgg_b2g4")}

_TIMM_RENAMES = (
    (r"^stem\.", "stage0."), *((rf"^stages\.{i}\.", f"stage{i + 1}.") for i in range(4)),
    (r"\.conv_kxk\.conv\.", ".rbr_dense.0."), (r"\.conv_kxk\.bn\.", ".rbr_dense.1."),
    (r"\.conv_1x1\.conv\.", ".rbr_1x1.0."), (r"\.conv_1x1\.bn\.", ".rbr_1x1.1."),
    (r"\.identity\.", ".rbr_identity."), (r"^head\.fc\.", "linear."),
)


default_cfgs = generate_default_cfgs({
    "repvgg_a0": _cfg(f"{_MS}/repvgg_a0-6e71139d.ckpt"),
    "repvgg_a1": _cfg(f"{_MS}/repvgg_a1-539513ac.ckpt"),
    "repvgg_a2": _cfg(f"{_MS}/repvgg_a2-cdc90b11.ckpt"),
    "repvgg_b0": _cfg(f"{_MS}/repvgg_b0-54d5862c.ckpt"),
    "repvgg_b1": _cfg(f"{_MS}/repvgg_b1-4673797.ckpt"),
    "repvgg_b2": _cfg(f"{_MS}/repvgg_b2-7c91ccd4.ckpt"),
    "repvgg_b3": _cfg(f"{_MS}/repvgg_b3-30b35f52.ckpt"),
    "repvgg_b1g2": _cfg(f"{_MS}/repvgg_b1g2-f0dc714f.ckpt"),
    "repvgg_b1g4": _cfg(f"{_MS}/repvgg_b1g4-bd93230e.ckpt"),
    "repvgg_b2g4": _cfg(f"{_MS}/repvgg_b2g4-e79eeadd.ckpt"),
}, timm_twins=_TIMM_TWINS, timm_renames=_TIMM_RENAMES)


# The grouped variants group every second stage block (block numbers 2, 4, ..., 26).
_GROUPED_BLOCKS = range(2, 27, 2)
_G2 = {i: 2 for i in _GROUPED_BLOCKS}
_G4 = {i: 4 for i in _GROUPED_BLOCKS}
_A_DEPTHS = (2, 4, 14, 1)
_B_DEPTHS = (4, 6, 16, 1)


@register_model
def repvgg_a0(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_a0", pretrained, num_blocks=_A_DEPTHS, width_multiplier=(0.75, 0.75, 0.75, 2.5),
                          **kwargs)


@register_model
def repvgg_a1(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_a1", pretrained, num_blocks=_A_DEPTHS, width_multiplier=(1.0, 1.0, 1.0, 2.5),
                          **kwargs)


@register_model
def repvgg_a2(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_a2", pretrained, num_blocks=_A_DEPTHS, width_multiplier=(1.5, 1.5, 1.5, 2.75),
                          **kwargs)


@register_model
def repvgg_b0(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_b0", pretrained, num_blocks=_B_DEPTHS, width_multiplier=(1.0, 1.0, 1.0, 2.5),
                          **kwargs)


@register_model
def repvgg_b1(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_b1", pretrained, num_blocks=_B_DEPTHS, width_multiplier=(2.0, 2.0, 2.0, 4.0),
                          **kwargs)


@register_model
def repvgg_b2(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_b2", pretrained, num_blocks=_B_DEPTHS, width_multiplier=(2.5, 2.5, 2.5, 5.0),
                          **kwargs)


@register_model
def repvgg_b3(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_b3", pretrained, num_blocks=_B_DEPTHS, width_multiplier=(3.0, 3.0, 3.0, 5.0),
                          **kwargs)


@register_model
def repvgg_b1g2(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_b1g2", pretrained, num_blocks=_B_DEPTHS, width_multiplier=(2.0, 2.0, 2.0, 4.0),
                          override_group_map=_G2, **kwargs)


@register_model
def repvgg_b1g4(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_b1g4", pretrained, num_blocks=_B_DEPTHS, width_multiplier=(2.0, 2.0, 2.0, 4.0),
                          override_group_map=_G4, **kwargs)


@register_model
def repvgg_b2g4(pretrained: bool = False, **kwargs) -> RepVGG:
    return _create_repvgg("repvgg_b2g4", pretrained, num_blocks=_B_DEPTHS, width_multiplier=(2.5, 2.5, 2.5, 5.0),
                          override_group_map=_G4, **kwargs)
