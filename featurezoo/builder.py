"""Model configuration and ``build_model_with_cfg``, the one place a model is
built, optionally given pretrained weights, and optionally wrapped for
feature extraction.
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple, Union

import torch.nn as nn

__all__ = ["ModelCfg", "build_model_with_cfg", "resolve_cfg", "generate_default_cfgs",
           "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD"]

_logger = logging.getLogger(__name__)

# The name ``create_model`` was called with, for cfgs (MindCV-style dicts) that carry none.
creating_model = contextvars.ContextVar("featurezoo_creating_model", default="")

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCfg:
    """What a user of a model needs to know besides its weights.

    ``first_conv`` and ``classifier`` name modules (``named_modules()`` paths,
    several joined by ``,``) so that loaders can adapt the input channels and
    drop the head.
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
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def classifier_names(self) -> Tuple[str, ...]:
        return tuple(n.strip() for n in self.classifier.split(",") if n.strip())

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
            raise ValueError(f"default_cfg has unknown key(s) {sorted(unknown)}; valid keys: {sorted(known)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in known}
        kwargs.setdefault("name", name)
        return cls(**kwargs, extra={k: v for k, v in cfg.items() if k in tolerated})


def resolve_cfg(cfg: Union[ModelCfg, Mapping[str, Any], None], name: str = "") -> ModelCfg:
    if cfg is None:
        return ModelCfg(name=name)
    if isinstance(cfg, ModelCfg):
        return cfg if cfg.name or not name else dataclasses.replace(cfg, name=name)
    if isinstance(cfg, Mapping):
        return ModelCfg.from_dict(cfg, name=name)
    raise ValueError(f"default_cfg must be a ModelCfg or a dict, got {type(cfg).__name__}")


def generate_default_cfgs(cfgs: Mapping[str, Union[ModelCfg, Mapping[str, Any]]]) -> Dict[str, ModelCfg]:
    """Turn ``{model_name: cfg}`` into frozen cfgs that know their model's name."""
    return {name: dataclasses.replace(resolve_cfg(cfg), name=name) for name, cfg in cfgs.items()}


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    pretrained: bool = False,
    default_cfg: Union[ModelCfg, Mapping[str, Any], None] = None,
    features_only: bool = False,
    out_indices: Union[Sequence[int], str, None] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``model_cls(**kwargs)``, load pretrained weights, wrap for features.

    This is the guide's calling convention: ``features_only`` and
    ``out_indices`` arrive among the model's keyword arguments and are taken
    out here, so the model class never sees them.

    Args:
        model_cls: the model class (or any callable returning an ``nn.Module``).
        pretrained: load the weights at ``default_cfg.url``.
        default_cfg: a :class:`ModelCfg` or a MindCV-style dict.
        features_only: return a :class:`FeatureExtractWrapper` instead.
        out_indices: which ``feature_info`` entries to output (see
            :func:`featurezoo.features.normalize_out_indices`); ``None`` = all.
    """
    cfg = resolve_cfg(default_cfg, name=creating_model.get() or getattr(model_cls, "__name__", ""))
    if not features_only and out_indices is not None:
        raise ValueError(f"out_indices={out_indices!r} was given for {cfg.name} without features_only=True")
    model = model_cls(**kwargs)
    model.default_cfg = cfg

    if features_only:
        from .features import FeatureExtractWrapper

        model = FeatureExtractWrapper(model, out_indices=out_indices, model_name=cfg.name)

    if pretrained:
        from .checkpoint import load_pretrained

        load_pretrained(
            model, cfg, num_classes=kwargs.get("num_classes", cfg.num_classes), in_channels=kwargs.get("in_channels", 3)
        )
    return model
