"""HaloNet, with MindCV's module tree and parameter names.

`Scaling Local Self-Attention for Parameter Efficient Visual Backbones
<https://arxiv.org/abs/2103.12731>`_: a ResNet-50-like network (tiered 3-conv
stem, SiLU) in which some bottlenecks replace their 3x3 conv by halo attention:
each ``block_size`` x ``block_size`` block of queries attends to the block
grown by ``halo_size`` pixels on every side.

Two details follow MindSpore rather than timm's ``halonet50ts`` (same layers
and parameter count):

* the stem's max pool pads with zeros (MindCV pads explicitly, then pools
  ``valid``), not with -inf;
* the key/value windows are cut by MindSpore's ``nn.Unfold``
  (``ExtractImagePatches``), whose output channels are ordered
  (window row, window column, channel), as TensorFlow's ``extract_image_patches``;
  MindCV then reshapes them as if they were ordered (channel, window position)
  like ``torch.nn.functional.unfold``. :func:`extract_image_patches` and the
  reshape after it reproduce that, so MindCV's trained weights see the keys and
  values they were trained with (timm's layout gives a different function).

Halo attention needs feature maps whose sides are multiples of ``block_size``
(8): with the stride-32 design that means input sides in ``256k-7 .. 256k``
(256 px, MindCV's default size, works; 64 px fails in ``stage3``).

``feature_info``: ``stem.conv3`` (stride 2, before the stem's pool) and
``stage1``..``stage4``; the stem is an ``nn.Sequential`` so the model is a
plain chain of modules.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..builder import SideRule, build_model_with_cfg, generate_default_cfgs
from ..layers.helpers import make_divisible, total_stride
from ..layers.init import he_uniform, init_weights
from ..layers.unfold import extract_image_patches
from ..registry import register_model

__all__ = ["HaloNet", "HaloAttention", "BottleneckBlock", "SelfAttnBlock", "extract_image_patches"]


class ActLayer(nn.Module):
    """MindCV's activation wrapper (``act.act``): SiLU, ReLU or identity."""

    def __init__(self, act: Optional[str]):
        super().__init__()
        if act == "silu":
            self.act: nn.Module = nn.SiLU()
        elif act == "relu":
            self.act = nn.ReLU()
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


class ConvBnAct(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 act: Optional[str] = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = ActLayer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BatchNormAct2d(nn.Module):
    def __init__(self, chs: int, act: Optional[str] = None):
        super().__init__()
        self.bn = nn.BatchNorm2d(chs)
        self.act = ActLayer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class SelectAdaptivePool2d(nn.Module):
    """Global average pooling, flattened to ``(N, C)``."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(x.mean(dim=(2, 3), keepdim=True))


class Stem(nn.Sequential):
    """Three 3x3 convs (the first with stride 2), then a stride-2 max pool over zero padding."""

    def __init__(self, act: str, in_channels: int = 3):
        super().__init__(OrderedDict([
            ("conv1", ConvBnAct(in_channels, 24, 3, stride=2, padding=1, act=act)),
            ("conv2", ConvBnAct(24, 32, 3, stride=1, padding=1, act=act)),
            ("conv3", ConvBnAct(32, 64, 3, stride=1, padding=1, act=act)),
            ("pad", nn.ZeroPad2d(1)),
            ("pool", nn.MaxPool2d(3, 2)),
        ]))
        self.out_channels = 64


def rel_logits_1d(q: torch.Tensor, rel_k: torch.Tensor, permute_mask: Sequence[int]) -> torch.Tensor:
    """Relative position logits along one axis.

    Args:
        q: ``(batch, height, width, dim)``.
        rel_k: ``(2 * window - 1, dim)``.
        permute_mask: where the output axes go; the result is
            ``(batch, height, width, window, window)`` permuted by it.
    """
    b, h, w, _ = q.shape
    rel_size = rel_k.shape[0]
    win_size = (rel_size + 1) // 2
    x = (q @ rel_k.transpose(0, 1)).reshape(-1, w, rel_size)
    # Pad and reshape to shift from relative to absolute indexing.
    x_pad = F.pad(F.pad(x, (0, 1)).flatten(1), (0, rel_size - w))
    x = x_pad.reshape(-1, w + 1, rel_size)[:, :w, win_size - 1:]
    x = x.reshape(b, h, 1, w, win_size).expand(-1, -1, win_size, -1, -1)
    return x.permute(*permute_mask)


class RelPosEmb(nn.Module):
    """Relative position logits of a block's queries over its halo window."""

    def __init__(self, block_size: int, win_size: int, dim_head: int):
        super().__init__()
        self.block_size = block_size
        self.dim_head = dim_head
        self.rel_height = nn.Parameter(torch.empty(2 * win_size - 1, dim_head))
        self.rel_width = nn.Parameter(torch.empty(2 * win_size - 1, dim_head))
        for p in (self.rel_height, self.rel_width):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        b, bb, hw, _ = q.shape
        q = q.reshape(-1, self.block_size, self.block_size, self.dim_head)
        rel_logits_w = rel_logits_1d(q, self.rel_width, permute_mask=(0, 1, 3, 2, 4))
        q = q.transpose(1, 2)
        rel_logits_h = rel_logits_1d(q, self.rel_height, permute_mask=(0, 3, 1, 4, 2))
        return (rel_logits_h + rel_logits_w).reshape(b, bb, hw, -1)


class HaloAttention(nn.Module):
    """Halo attention (MindCV's layout of the key/value windows, see the module docstring).

    Args:
        dim: input channels.
        dim_out: output channels (``dim`` if not set); values get ``dim_out // num_heads`` per head.
        stride: query stride (1 in HaloNet-50T).
        num_heads: attention heads.
        block_size: side of a query block.
        halo_size: pixels added on each side of a block for its keys/values.
        qk_ratio: query/key width relative to ``dim_out``.
        qkv_bias: biases in the q and kv projections.
        avg_down: downsample by average pooling instead of strided queries.
        scale_pos_embed: scale the position logits together with ``q @ k``.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, stride: int = 1, num_heads: int = 8,
                 block_size: int = 8, halo_size: int = 3, qk_ratio: float = 1.0, qkv_bias: bool = False,
                 avg_down: bool = False, scale_pos_embed: bool = False):
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"dim_out={dim_out} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dim_head_qk = make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + halo_size * 2
        self.block_stride = stride
        use_avg_pool = False
        if stride > 1:
            # As MindCV: queries are strided even when an average pool is added (timm strides one or the other).
            use_avg_pool = avg_down or block_size % stride != 0
            self.block_size_ds = block_size // stride
        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias)
        self.pos_embed = RelPosEmb(self.block_size_ds, self.win_size, self.dim_head_qk)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % self.block_size or w % self.block_size:
            raise ValueError(
                f"HaloAttention: feature map {h}x{w} is not divisible by block_size={self.block_size}; "
                f"HaloNet-50T needs input sides in 256k-7..256k (e.g. 256 px)"
            )
        num_h_blocks, num_w_blocks = h // self.block_size, w // self.block_size
        num_blocks = num_h_blocks * num_w_blocks
        bs = self.block_size_ds

        q = self.q(x).reshape(-1, self.dim_head_qk, num_h_blocks, bs, num_w_blocks, bs).permute(0, 1, 3, 5, 2, 4)
        q = q.reshape(b * self.num_heads, self.dim_head_qk, -1, num_blocks).transpose(1, 3)
        # q: B * heads, num_blocks, block_size ** 2, dim_head_qk

        kv = F.pad(self.kv(x), [self.halo_size] * 4)
        kv = extract_image_patches(kv, self.win_size, self.block_size)
        kv = kv.reshape(b * self.num_heads, self.dim_head_qk + self.dim_head_v, -1, num_blocks).transpose(1, 3)
        k, v = kv.split([self.dim_head_qk, self.dim_head_v], dim=-1)
        # k, v: B * heads, num_blocks, win_size ** 2, dim_head

        if self.scale_pos_embed:
            attn = (q @ k.transpose(-1, -2) + self.pos_embed(q)) * self.scale
        else:
            attn = (q @ k.transpose(-1, -2)) * self.scale + self.pos_embed(q)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 3)  # B * heads, dim_head_v, block_size ** 2, num_blocks
        out = out.reshape(-1, bs, bs, num_h_blocks, num_w_blocks).permute(0, 3, 1, 4, 2)
        out = out.reshape(b, self.dim_out_v, h // self.block_stride, w // self.block_stride)
        return self.pool(out)


class BottleneckBlock(nn.Module):
    """ResNet bottleneck 1x1 - 3x3 (strided) - 1x1 with SiLU; a 1x1 conv shortcut in a stage's first block."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, act: str, downsample: bool = False,
                 shortcut: bool = False):
        super().__init__()
        mid_chs = out_chs // 4
        self.stride = stride
        self.conv1_1x1 = ConvBnAct(in_chs, mid_chs, 1, 1, 0, act=act)
        self.conv2_kxk = ConvBnAct(mid_chs, mid_chs, 3, stride, 1, act=act)
        self.conv2b_kxk = nn.Identity()
        self.conv3_1x1 = ConvBnAct(mid_chs, out_chs, 1, 1, 0)
        self.attn = nn.Identity()
        self.attn_last = nn.Identity()
        self.shortcut = shortcut
        if shortcut:
            # MindCV strides the shortcut only where the stage asks for downsampling (stage1 has stride 1 anyway).
            self.creat_shortcut = ConvBnAct(in_chs, out_chs, 1, stride if downsample else 1, 0)
        self.Identity = nn.Identity()
        self.act = ActLayer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3_1x1(self.attn(self.conv2b_kxk(self.conv2_kxk(self.conv1_1x1(x)))))
        out = self.attn_last(out)
        h = self.creat_shortcut(x) if self.shortcut else self.Identity(x)
        return self.act(out + h)


class SelfAttnBlock(nn.Module):
    """Bottleneck whose 3x3 conv is halo attention followed by BN + SiLU."""

    def __init__(self, chs: int, num_heads: int, block_size: int, halo_size: int, act: str, stride: int = 1,
                 shortcut: bool = False, hidden_chs: Optional[int] = None):
        super().__init__()
        mid_chs = chs // 4
        in_chs = chs if hidden_chs is None else hidden_chs
        self.stride = stride
        self.conv1_1x1 = ConvBnAct(in_chs, mid_chs, 1, 1, 0, act=act)
        self.conv2_kxk = nn.Identity()
        self.conv3_1x1 = ConvBnAct(mid_chs, chs, 1, 1, 0)
        self.self_attn = HaloAttention(mid_chs, dim_out=mid_chs, stride=stride, num_heads=num_heads,
                                       block_size=block_size, halo_size=halo_size)
        self.post_attn = BatchNormAct2d(mid_chs, act=act)
        self.shortcut = shortcut
        if shortcut:
            self.creat_shortcut = ConvBnAct(in_chs, chs, 1, stride, 0)
        self.Identity = nn.Identity()
        self.act = ActLayer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3_1x1(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        h = self.creat_shortcut(x) if self.shortcut else self.Identity(x)
        return self.act(out + h)


class HaloStage(nn.Module):
    """A stage: ``blocks`` run in order; the first has the stride and a projection shortcut."""

    def __init__(self, block_types: Sequence[str], block_size: int, halo_size: int, channel: int,
                 out_channel: int, stride: int, num_head: int, act: str, hidden_chs: Optional[int] = None,
                 downsample: bool = False):
        super().__init__()
        blocks: List[nn.Module] = []
        for idx, block_type in enumerate(block_types):
            first = idx == 0
            block_stride = stride if first else 1
            if block_type == "bottle":
                blocks.append(BottleneckBlock(channel if first else out_channel, out_channel, block_stride, act,
                                              downsample=first and downsample, shortcut=first))
            elif block_type == "attn":
                if num_head <= 0:
                    raise ValueError(f"an 'attn' block needs num_head > 0, got {num_head}")
                blocks.append(SelfAttnBlock(out_channel, num_head, block_size, halo_size, act, stride=block_stride,
                                            shortcut=first, hidden_chs=hidden_chs if first else None))
            else:
                raise ValueError(f"unknown block type {block_type!r}; valid: 'bottle', 'attn'")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class HaloNet(nn.Module):
    """HaloNet classifier: ``stem`` -> ``stage1``..``stage4`` -> ``classifier`` (pool, dense, identity).

    Args:
        depth_list: unused beyond a check: blocks per stage, as MindCV's argument.
        block_size, halo_size: halo attention geometry.
        stage_blocks: per stage, the block types (``"bottle"`` or ``"attn"``).
        chs_list: stem output channels, then each stage's output channels.
        num_heads: attention heads per stage.
        stride_list: stride of each stage's first block.
        hidden_chs: input channels of a stage-opening attention block (``None``: its output channels).
        act: ``"silu"`` or ``"relu"``.
        num_classes, in_channels: classifier outputs, input channels.
    """

    def __init__(self, depth_list: Sequence[int], block_size: int, halo_size: int,
                 stage_blocks: Sequence[Sequence[str]], chs_list: Sequence[int], num_heads: Sequence[int],
                 stride_list: Sequence[int], hidden_chs: Optional[int] = None, act: str = "silu",
                 num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        if [len(b) for b in stage_blocks] != list(depth_list):
            raise ValueError(f"depth_list {list(depth_list)} does not match the block lists {stage_blocks}")
        self.stem = Stem(act, in_channels)
        reduction = total_stride(self.stem.conv1, self.stem.conv2, self.stem.conv3)
        self.feature_info = [dict(chs=self.stem.out_channels, reduction=reduction, name="stem.conv3")]
        reduction *= total_stride(self.stem.pool)
        for i, blocks in enumerate(stage_blocks):
            reduction *= stride_list[i]
            self.add_module(f"stage{i + 1}", HaloStage(
                blocks, block_size, halo_size, chs_list[i], chs_list[i + 1], stride_list[i], num_heads[i], act,
                hidden_chs=hidden_chs, downsample=i > 0))
            self.feature_info.append(dict(chs=chs_list[i + 1], reduction=reduction, name=f"stage{i + 1}"))
        self.num_features = chs_list[-1]
        self.classifier = nn.Sequential(SelectAdaptivePool2d(), nn.Linear(self.num_features, num_classes),
                                        nn.Identity())
        init_weights(self, conv=he_uniform, linear=he_uniform)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_halonet(variant: str, pretrained: bool = False, **kwargs) -> HaloNet:
    return build_model_with_cfg(HaloNet, pretrained, default_cfg=default_cfgs[variant], **kwargs)


def _cfg(url: str = "", **kwargs):
    return dict(url=url, num_classes=1000, input_size=(3, 256, 256), first_conv="stem.conv1.conv",
                classifier="classifier", input_sides=(256, 249),
                side_rules=(SideRule(256, (0, *range(249, 256)), minimum=249, from_reduction=8),),
                size_note="halo attention needs every stage map divisible by its block size 8: sides 256k-7..256k px "
                          "(stage1 and before run at any size)",
                **kwargs)


_MS = "https://download.mindspore.cn/toolkits/mindcv"
default_cfgs = generate_default_cfgs({
    "halonet_50t": _cfg(f"{_MS}/halonet/halonet_50t-533da6be.ckpt"),
})

# No timm twin: timm's halonet50ts has the same parameters (tests/test_halonet.py maps them), but
# its weights would not compute here what they compute in timm (see the module docstring).


@register_model
def halonet_50t(pretrained: bool = False, **kwargs) -> HaloNet:
    return _create_halonet(
        "halonet_50t", pretrained, depth_list=(3, 4, 6, 3), block_size=8, halo_size=3,
        stage_blocks=(("bottle",) * 3, ("bottle",) * 3 + ("attn",), ("bottle", "attn") * 3,
                      ("bottle", "attn", "bottle")),
        chs_list=(64, 256, 512, 1024, 2048), num_heads=(0, 4, 8, 8), stride_list=(1, 2, 2, 2), act="silu",
        **kwargs)
