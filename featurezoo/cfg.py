"""``ModelCfg``: everything about a model besides its weights, declared beside its builder.

A family module declares ``default_cfgs = generate_default_cfgs({...})`` before its
``@register_model`` builders; :func:`featurezoo.registry.register_model` files each
cfg under its model's name, so the registry, the loader, the command line and the
tests read these facts without building anything. A declaration is checked when
it is made: an unknown key, a malformed input size or a rename rule that is not a
regular expression is a ``ValueError`` at import.

This module imports nothing from featurezoo: it is the bottom layer.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["ModelCfg", "resolve_cfg", "generate_default_cfgs", "RenameRules", "IndexMap", "SideRule",
           "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD"]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)



@dataclass(frozen=True)
class IndexMap:
    r"""A rename replacement that renumbers: ``template`` formatted with each captured group
    ``g`` as ``scale * int(g) + offset`` (one ``(scale, offset)`` per group).

    >>> import re
    >>> re.sub(r"^block(\d+)\.", IndexMap("blocks.{0}.", (1, -1)), "block3.conv.weight")
    'blocks.2.conv.weight'

    A frozen dataclass rather than a lambda, so a cfg (and a model holding it) can be
    copied and pickled.
    """

    template: str
    terms: Tuple[Tuple[int, int], ...] = ()

    def __init__(self, template: str, *terms: Tuple[int, int]):
        object.__setattr__(self, "template", template)
        object.__setattr__(self, "terms", tuple(tuple(t) for t in terms))

    def __call__(self, match: "re.Match[str]") -> str:
        values = [scale * int(match.group(i + 1)) + offset for i, (scale, offset) in enumerate(self.terms)]
        return self.template.format(*values)


@dataclass(frozen=True)
class SideRule:
    """The input sides a model takes: ``side >= minimum`` and ``side % modulus`` in ``residues``
    (NASNet's padding emulation: ``SideRule(16, (11, 12, 13, 14, 15, 0, 1, 2))``). A feature model
    is held to the rule only when it outputs a level of reduction ``from_reduction`` or deeper (the
    levels before the layer that needs it run at any size); the classifier always is.

    >>> SideRule(16, (0, 1)).accepts(64), SideRule(16, (0, 1)).accepts(66), SideRule(16, (0, 1)).nearest(66)
    (True, False, [64, 65, 80, 81])
    """

    modulus: int
    residues: Tuple[int, ...]
    minimum: int = 1
    from_reduction: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.modulus, int) and self.modulus > 0 and self.residues
                and all(isinstance(r, int) and 0 <= r < self.modulus for r in self.residues)):
            raise ValueError(f"SideRule({self.modulus!r}, {self.residues!r}): residues must be ints in "
                             f"0..modulus-1, modulus a positive int")
        object.__setattr__(self, "residues", tuple(sorted(set(self.residues))))

    def accepts(self, side: int) -> bool:
        return side >= self.minimum and side % self.modulus in self.residues

    def nearest(self, side: int, count: int = 2) -> List[int]:
        """The ``count`` valid sides below and above ``side`` (fewer near ``minimum``)."""
        below = [s for s in range(side - 1, max(self.minimum, side - 4 * self.modulus) - 1, -1) if self.accepts(s)]
        above = [s for s in range(max(side + 1, self.minimum), side + 4 * self.modulus + self.minimum)
                 if self.accepts(s)]
        return sorted(below[:count] + above[:count])

    def describe(self) -> str:
        return (f"sides s with s % {self.modulus} in {list(self.residues)}"
                + (f" and s >= {self.minimum}" if self.minimum > 1 else ""))


# ((regex, replacement), ...) applied in order to checkpoint names (``re.sub``); a
# replacement is a string (backreferences allowed) or an :class:`IndexMap`.
RenameRules = Tuple[Tuple[str, Union[str, IndexMap]], ...]


def _check_rules(model: str, key: str, rules: Any) -> RenameRules:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, (list, tuple)):
        raise ValueError(f"{model}: {key} must be a tuple of (pattern, replacement) pairs, got {rules!r}")
    out = []
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
                and isinstance(rule[1], (str, IndexMap))):
            raise ValueError(f"{model}: {key} entry {rule!r} is not a (pattern, replacement) pair: a regex string "
                             f"and a replacement string or a featurezoo.cfg.IndexMap")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"{model}: {key} pattern {rule[0]!r} is not a regular expression: {e}") from None
        out.append((rule[0], rule[1]))
    return tuple(out)


def _check_size(model: str, key: str, value: Any) -> Optional[Tuple[int, int, int]]:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{model}: {key} must be (channels, height, width) of positive ints, got {value!r}")
    return tuple(value)  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelCfg:
    """What a user of a model needs to know besides its weights.

    Weights and preprocessing:
        url, num_classes, input_size, mean, std, interpolation, crop_pct.
    Module names (``named_modules()`` paths, several joined by ``,``), so
    loaders can adapt the input channels and drop the head:
        first_conv, classifier.
    Input-size facts, read by the command line and the tests:
        fixed_input_size: the classifier accepts only ``input_size`` (e.g. a
            flattening head); feature models may still take other sizes.
        min_input_size: the smallest input the model runs at.
        side_rules: :class:`SideRule` s every input side must satisfy; the
            feature model (for the levels a rule covers) and the classifier
            refuse other sizes with a ``ValueError`` (checked before the
            forward, see :func:`featurezoo.validate.check_input_size`).
        input_sides: when not ``()``, the model runs only at these square
            sides (and sizes of the same rule, given in ``size_note``).
        valid_padding: why, if so, the maps are smaller than
            ``ceil(size / reduction)`` (unpadded stems, floor pools).
        size_note: why the size facts are what they are.
    Detector options:
        output_strides: the ``output_stride`` values the model builds (its
            last stages dilated instead of strided); ``()``: not supported.
        stage_modules: for ``frozen_stages``, where a model's levels do not
            tell its stages apart (HRNet's levels all leave through the last
            stage): the stem's module paths, then each stage's (several joined
            by ``,``). ``()``: found from ``feature_info`` (see
            :mod:`featurezoo.freezing`).
    Checkpoint names:
        timm_twin: the timm model whose weights map exactly onto this one.
        timm_renames: rules turning timm names into ours (applied in order).
        timm_convert: a function ``state_dict -> state_dict`` used instead of
            ``timm_renames`` when renaming is not enough.
        mindcv_renames: rules for MindCV checkpoints whose saved names are not
            the module paths of MindCV's own code.
    """

    name: str = ""
    url: str = ""
    num_classes: int = 1000
    input_size: Tuple[int, int, int] = (3, 224, 224)
    mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, ...] = IMAGENET_DEFAULT_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    first_conv: str = "conv1"
    classifier: str = "classifier"
    fixed_input_size: bool = False
    min_input_size: Optional[Tuple[int, int, int]] = None
    input_sides: Tuple[int, ...] = ()
    side_rules: Tuple[SideRule, ...] = ()
    valid_padding: str = ""
    size_note: str = ""
    output_strides: Tuple[int, ...] = ()
    stage_modules: Tuple[str, ...] = ()
    timm_twin: str = ""
    timm_renames: RenameRules = ()
    timm_convert: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = field(default=None, compare=False)
    mindcv_renames: RenameRules = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        who = self.name or "default_cfg"
        object.__setattr__(self, "input_size", _check_size(who, "input_size", self.input_size))
        object.__setattr__(self, "min_input_size", _check_size(who, "min_input_size", self.min_input_size))
        object.__setattr__(self, "timm_renames", _check_rules(who, "timm_renames", self.timm_renames))
        object.__setattr__(self, "mindcv_renames", _check_rules(who, "mindcv_renames", self.mindcv_renames))
        sides = self.input_sides
        if not isinstance(sides, (list, tuple)) or any(
                not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sides):
            raise ValueError(f"{who}: input_sides must be a tuple of positive ints, got {sides!r}")
        object.__setattr__(self, "input_sides", tuple(sides))
        strides = self.output_strides
        if not isinstance(strides, (list, tuple)) or any(s not in (8, 16, 32) or isinstance(s, bool) for s in strides):
            raise ValueError(f"{who}: output_strides must be a tuple of 8, 16, 32, got {strides!r}")
        object.__setattr__(self, "output_strides", tuple(strides))
        if (self.timm_renames or self.timm_convert) and not self.timm_twin:
            raise ValueError(f"{who}: timm_renames/timm_convert are declared but timm_twin is empty")
        if self.timm_convert is not None and not callable(self.timm_convert):
            raise ValueError(f"{who}: timm_convert must be callable, got {self.timm_convert!r}")
        if not isinstance(self.side_rules, (list, tuple)) or not all(isinstance(r, SideRule) for r in self.side_rules):
            raise ValueError(f"{who}: side_rules must be a tuple of featurezoo.cfg.SideRule, got {self.side_rules!r}")
        object.__setattr__(self, "side_rules", tuple(self.side_rules))
        if (self.input_sides or self.fixed_input_size or self.min_input_size or self.side_rules) \
                and not self.size_note:
            raise ValueError(f"{who}: input-size constraints need a size_note saying why")

    @property
    def classifier_names(self) -> Tuple[str, ...]:
        return tuple(n.strip() for n in self.classifier.split(",") if n.strip())

    @property
    def first_conv_names(self) -> Tuple[str, ...]:
        return tuple(n.strip() for n in self.first_conv.split(",") if n.strip())

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], name: str = "") -> "ModelCfg":
        """Accept a MindCV-style dict (``url``, ``num_classes``, ``first_conv``, ...).

        Keys that MindCV uses but we have no field for (``pool_size``) go to
        ``extra``; a key that is neither is a typo and an error.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        tolerated = {"pool_size"}
        unknown = set(cfg) - known - tolerated
        if unknown:
            raise ValueError(f"{name or 'default_cfg'}: unknown key(s) {sorted(unknown)}; "
                             f"valid keys: {sorted(known)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in known}
        kwargs.setdefault("name", name)
        return cls(**kwargs, extra={k: v for k, v in cfg.items() if k in tolerated})


def resolve_cfg(cfg: Union[ModelCfg, Mapping[str, Any], None], name: str = "") -> ModelCfg:
    """A :class:`ModelCfg` from a cfg, a MindCV-style dict or ``None``, named ``name`` if it has no name."""
    if cfg is None:
        return ModelCfg(name=name)
    if isinstance(cfg, ModelCfg):
        return cfg if cfg.name or not name else dataclasses.replace(cfg, name=name)
    if isinstance(cfg, Mapping):
        return ModelCfg.from_dict(cfg, name=name)
    raise ValueError(f"default_cfg must be a ModelCfg or a dict, got {type(cfg).__name__}")


def generate_default_cfgs(
    cfgs: Mapping[str, Union[ModelCfg, Mapping[str, Any]]],
    *,
    timm_twins: Optional[Mapping[str, str]] = None,
    timm_renames: RenameRules = (),
    timm_convert: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
    mindcv_renames: RenameRules = (),
) -> Dict[str, ModelCfg]:
    """Turn ``{model_name: cfg}`` into frozen cfgs that know their model's name.

    The family-wide checkpoint facts are declared here once: ``timm_twins`` maps
    our model names to timm's (each must be one of ``cfgs``' names), and
    ``timm_renames`` / ``timm_convert`` / ``mindcv_renames`` apply to the family.
    """
    twins = dict(timm_twins or {})
    unknown = sorted(set(twins) - set(cfgs))
    if unknown:
        raise ValueError(f"timm_twins names model(s) {unknown} that this family does not declare; "
                         f"its models: {sorted(cfgs)}")
    if (timm_renames or timm_convert) and not twins:
        raise ValueError("timm_renames/timm_convert are declared without timm_twins")
    out = {}
    for name, cfg in cfgs.items():
        base = resolve_cfg(cfg, name=name)
        facts: Dict[str, Any] = {"name": name}
        if name in twins:
            facts.update(timm_twin=twins[name], timm_renames=tuple(timm_renames) or base.timm_renames,
                         timm_convert=timm_convert or base.timm_convert)
        if mindcv_renames:
            facts["mindcv_renames"] = tuple(mindcv_renames)
        out[name] = dataclasses.replace(base, **facts)
    return out
