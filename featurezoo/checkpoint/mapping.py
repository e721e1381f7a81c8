"""Mapping checkpoint names onto a model's names: fixed rules first, then, only
when asked (``auto_mapping``), a shape-checked, one-to-one fallback that
refuses ambiguity. Every rename is logged and returned.
"""
from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from .errors import CheckpointError

__all__ = ["NameMapping", "map_names", "candidate_names", "rename_by_rules", "MINDSPORE_LEAVES", "flatten_name"]

_logger = logging.getLogger(__name__)

# MindSpore's names for normalisation parameters and statistics.
MINDSPORE_LEAVES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                    "moving_variance": "running_var"}
# Training state that MindSpore/MindCV store beside the weights.
_TRAINING_STATE = re.compile(
    r"^(learning_rate|global_step|momentum|scale_sense|current_iterator_step|last_overflow_iterator_step|"
    r"epoch_num|step_num|loss_scale|beta1_power|beta2_power|"
    r"(moments|accum|adam_m|adam_v|moment1|moment2|stat|accumulation|ema_update)\..*)$"
)
_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "net.", "network.", "_backbone.")


@dataclass
class NameMapping:
    """Result of mapping: ``mapped`` is keyed by the model's names."""

    mapped: Dict[str, torch.Tensor] = field(default_factory=dict)
    remapped: List[Tuple[str, str, str]] = field(default_factory=list)  # (checkpoint name, model name, rule)
    unmatched: Dict[str, torch.Tensor] = field(default_factory=dict)
    training_state: List[str] = field(default_factory=list)
    ema_dropped: List[str] = field(default_factory=list)


def rename_by_rules(state: Mapping[str, torch.Tensor], rules: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Apply ``(regex, replacement)`` rules, in order, to every name (family-declared renames)."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for pattern, repl in compiled:
            name = pattern.sub(repl, name)
        out[name] = tensor
    return out


def flatten_name(name: str) -> str:
    """MindCV's wrapper flattens ``features.3.conv.weight`` to ``features_3.conv.weight``."""
    container, _, rest = name.partition(".")
    child, dot, tail = rest.partition(".")
    return f"{container}_{child}.{tail}" if dot else name


def _leaf_renamed(name: str) -> Optional[str]:
    head, _, leaf = name.rpartition(".")
    if leaf in MINDSPORE_LEAVES:
        return f"{head}.{MINDSPORE_LEAVES[leaf]}" if head else MINDSPORE_LEAVES[leaf]
    return None


def candidate_names(name: str, auto_mapping: bool) -> List[Tuple[str, str]]:
    """Names a checkpoint key may stand for, with the rule that produced each."""
    out = [(name, "")]
    if auto_mapping:
        stripped = name
        rules = []
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if stripped.startswith(p):
                    stripped, changed = stripped[len(p):], True
                    rules.append(f"strip {p!r}")
        if rules:
            out.append((stripped, ", ".join(rules)))
    more = []
    for cand, rule in out:
        leaf = _leaf_renamed(cand)
        if leaf:
            more.append((leaf, (rule + ", " if rule else "") + "MindSpore leaf name"))
    return out + more


def map_names(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Size], *, ema: bool = False,
              auto_mapping: bool = False, model_name: str = "model") -> NameMapping:
    """Map ``source`` (checkpoint) names onto ``target`` (model state_dict names -> shapes).

    Fixed rules, always: MindSpore leaf names (``gamma``->``weight`` where the
    model has no ``gamma`` of its own, so a layer-scale ``gamma`` stays),
    ``ema.`` handling, training state set aside. With ``auto_mapping``: wrapper
    prefixes, MindCV's flattened names, then equal-shape pairing.
    """
    result = NameMapping()
    src: Dict[str, torch.Tensor] = {}
    ema_keys = {k: v for k, v in source.items() if k.startswith("ema.")}
    if ema:
        if not ema_keys:
            raise CheckpointError(
                "ema=True but the checkpoint has no EMA weights (no 'ema.'-prefixed names and no EMA container); "
                "load it with ema=False"
            )
        src = {k[len("ema."):]: v for k, v in ema_keys.items()}
    else:
        src = {k: v for k, v in source.items() if not (k.startswith("ema.") and k[4:] in source)}
        result.ema_dropped = sorted(set(source) - set(src))

    flat_index: Dict[str, str] = {}
    if auto_mapping:
        for t in target:
            f = flatten_name(t)
            if f != t:
                flat_index[f] = t

    taken: Set[str] = set()
    for name, tensor in src.items():
        if _TRAINING_STATE.match(name) and name not in target:
            result.training_state.append(name)
            continue
        hit = None
        for cand, rule in candidate_names(name, auto_mapping):
            if cand in target and cand not in taken:
                hit = (cand, rule)
                break
            if auto_mapping and cand in flat_index and flat_index[cand] not in taken:
                hit = (flat_index[cand], (rule + ", " if rule else "") + "flattened name")
                break
        if hit is None:
            result.unmatched[name] = tensor
            continue
        dst, rule = hit
        taken.add(dst)
        result.mapped[dst] = tensor
        if rule:
            result.remapped.append((name, dst, rule))

    if auto_mapping and result.unmatched:
        _pair_by_shape(result, target, taken, model_name)
    for src_name, dst, rule in result.remapped:
        _logger.info("checkpoint %s -> %s (%s)", src_name, dst, rule)
    return result


def _pair_by_shape(result: NameMapping, target: Mapping[str, torch.Size], taken: Set[str], model_name: str) -> None:
    """Pair leftovers only where shape makes the pairing unique."""
    free = [t for t in target if t not in taken and not t.endswith("num_batches_tracked")]
    by_shape_t: Dict[Tuple[int, ...], List[str]] = {}
    for t in free:
        by_shape_t.setdefault(tuple(target[t]), []).append(t)
    by_shape_s: Dict[Tuple[int, ...], List[str]] = {}
    for s, v in result.unmatched.items():
        by_shape_s.setdefault(tuple(v.shape), []).append(s)
    for shape, sources in by_shape_s.items():
        targets = by_shape_t.get(shape, [])
        if not targets:
            continue
        if len(sources) == 1 and len(targets) == 1:
            s, t = sources[0], targets[0]
            result.mapped[t] = result.unmatched.pop(s)
            result.remapped.append((s, t, "only tensor of this shape left"))
            continue
        detail = "; ".join(
            f"{s} ~ {difflib.get_close_matches(s, targets, n=3, cutoff=0) }" for s in sources[:5]
        )
        raise CheckpointError(
            f"{model_name}: auto_mapping cannot pair {len(sources)} checkpoint tensor(s) of shape {list(shape)} with "
            f"{len(targets)} model tensor(s) of that shape unambiguously; candidates: {detail}"
        )
