"""``frozen_stages`` and ``norm_eval`` with the meaning mmdetection and mmpretrain give them,
for any feature model, found from the model's own computation rather than declared per family.

Stages. A model's *stages* are read from its ``feature_info``: the native entries
(not the parameter-free derived levels of plain models) at reduction 4 or more,
grouped by reduction, so stage 1 is the stride-4 stage, stage 2 the stride-8 one,
and so on (ResNet's ``layer1..layer4``, Swin's four stages, HRNet's four stages,
a MobileNet's blocks at each stride). In a plain model every block has one
stride; there each block entry is a stage (mmpretrain's ViT meaning: frozen
stages are the first blocks). An entry may carry ``stage=`` to say it outright
(a dilated model whose last stages share one stride).

Freezing. ``frozen_stages=k`` freezes the *stem* and stages ``1..k``: every
parameter that the output of stage ``k`` depends on (found by one small forward
and backward through the model, so a parameter frozen is exactly one that
computes the frozen levels, whatever the family's module tree). The stem
(``k = 0``) is what stage 1's first entry depends on minus that entry's own
module. ``-1`` freezes nothing. Frozen parameters get ``requires_grad=False``
and the modules all of whose parameters are frozen stay in eval mode through
``model.train()`` (their BatchNorm statistics and dropout do not change).
A model whose levels do not separate its stages (HRNet: every level leaves through
the last stage's fusion) declares ``stage_modules`` in its cfg instead: the stem's
modules, then each stage's; ``frozen_stages=k`` then freezes the parameters under
the first ``k + 1`` of them.
``norm_eval=True`` keeps every normalisation layer with running statistics in
eval mode in training (its affine parameters still train).

Layer: imports torch only.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Set, Tuple

import torch
import torch.nn as nn

__all__ = ["stage_entries", "check_frozen_stages", "frozen_parameter_names", "frozen_modules", "apply_eval_modes",
           "probe_input_size", "stage_table", "num_stages"]


def stage_entries(info: Sequence[Mapping[str, Any]]) -> List[List[int]]:
    """The ``feature_info`` indices of each stage, in order (see the module docstring)."""
    deep = [i for i, e in enumerate(info) if e.get("native", True) and e["reduction"] >= 4]
    if any("stage" in info[i] for i in deep):
        keys = [info[i].get("stage") for i in deep]
        if any(k is None for k in keys):
            raise ValueError("feature_info: either every stage entry declares 'stage' or none does")
        order = sorted(set(keys))
        return [[i for i in deep if info[i]["stage"] == s] for s in order]
    reductions = sorted({info[i]["reduction"] for i in deep})
    if len(reductions) == 1 and len(deep) > 1:
        return [[i] for i in deep]
    return [[i for i in deep if info[i]["reduction"] == r] for r in reductions]


def check_frozen_stages(frozen_stages: Any, num_stages: int, model_name: str) -> int:
    if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
        raise ValueError(f"{model_name}: frozen_stages={frozen_stages!r} is not valid; it has {num_stages} stages, "
                         f"use -1 (nothing frozen), 0 (the stem) or 1..{num_stages} (the stem and that many stages)")
    return frozen_stages


def probe_input_size(cfg: Any) -> Tuple[int, int]:
    """A small input size the model accepts, from its declared size facts."""
    sides = tuple(getattr(cfg, "input_sides", ()) or ())
    if sides:
        return sides[0], sides[0]
    side = 128 if getattr(cfg, "valid_padding", "") else 64
    low = getattr(cfg, "min_input_size", None)
    if low:
        side = max(side, low[1], low[2])
    return side, side


def _unit(names: Sequence[str], name: str) -> str:
    """``name`` cut to the depth where the stage names part: ``layers.0.blocks.1`` among
    ``layers.1.blocks.1, ...`` is ``layers.0``; ``layer1`` among ``layer2, ...`` is ``layer1``."""
    split = [n.split(".") for n in names]
    depth = 0
    while all(len(s) > depth for s in split) and len({s[depth] for s in split}) == 1:
        depth += 1
    return ".".join(name.split(".")[:depth + 1])


def num_stages(info: Sequence[Mapping[str, Any]], stage_modules: Sequence[str] = ()) -> int:
    return len(stage_modules) - 1 if stage_modules else len(stage_entries(info))


def frozen_parameter_names(model: nn.Module, info: Sequence[Mapping[str, Any]], frozen_stages: int,
                           levels: Callable[[torch.Tensor, List[int]], Sequence[torch.Tensor]],
                           size: Tuple[int, int], in_channels: int, model_name: str,
                           stage_modules: Sequence[str] = ()) -> Set[str]:
    """The names of the parameters ``frozen_stages`` freezes (``levels(x, indices)`` computes the
    ``feature_info`` entries ``indices``, ascending, on the complete model)."""
    if frozen_stages < 0:
        return set()
    if stage_modules:
        prefixes = tuple(m.strip() + "." for group in stage_modules[:frozen_stages + 1] for m in group.split(","))
        return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    stages = stage_entries(info)
    if frozen_stages == 0:
        entry = stages[0][0]
    else:
        entry = stages[frozen_stages - 1][-1]
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not params:
        return set()
    device = params[0][1].device
    was_training, flags = model.training, [p.requires_grad for _, p in params]
    try:
        model.eval()
        for _, p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            x = torch.zeros(1, in_channels, *size, device=device)
            out = levels(x, [entry])[0]
            grads = torch.autograd.grad(out.float().sum(), [p for _, p in params], allow_unused=True)
    finally:
        for (_, p), flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    deps = {n for (n, _), g in zip(params, grads) if g is not None}
    if frozen_stages > 0:
        return deps
    first_names = [info[s[0]]["name"] for s in stages]
    unit = _unit(first_names, info[entry]["name"])
    own = {n for n in deps if n.startswith(unit + ".")}
    if not own:
        raise ValueError(f"{model_name}: frozen_stages=0 (the stem alone) needs stage 1's entry "
                         f"{info[entry]['name']!r} to be a module path; use frozen_stages >= 1 or -1")
    return deps - own


def frozen_modules(model: nn.Module, frozen: Set[str]) -> List[str]:
    """The outermost modules all of whose (one or more) parameters are in ``frozen``."""
    out: List[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        names = [prefix + n for n, _ in module.named_parameters()]
        if names and all(n in frozen for n in names):
            out.append(prefix[:-1])
            return
        for name, child in module.named_children():
            visit(child, prefix + name + ".")

    visit(model, "")
    return out


def apply_eval_modes(model: nn.Module, frozen_module_names: Sequence[str], norm_eval: bool) -> None:
    """After ``model.train()``: frozen modules and (with ``norm_eval``) normalisation layers back to eval."""
    if not model.training:
        return
    for name in frozen_module_names:
        try:
            model.get_submodule(name).eval()
        except AttributeError:  # pruned away
            continue
    if norm_eval:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.eval()


def stage_table(info: Sequence[Mapping[str, Any]]) -> Dict[int, List[str]]:
    """{stage number: entry names}, for error messages and the README table."""
    return {k + 1: [info[i]["name"] for i in s] for k, s in enumerate(stage_entries(info))}

