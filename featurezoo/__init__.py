"""featurezoo: vision backbones with multi-scale feature extraction (MindCV-compatible)."""
from .builder import build_model_with_cfg
from .cfg import ModelCfg
from .checkpoint import CheckpointError, LoadReport, load_checkpoint, save_checkpoint
from .factory import create_model
from .discovery import discover, wrap
from .features import FeatureExtractWrapper, FeatureInfo, get_feature_info
from .registry import (build_on_meta, get_model_cfg, is_model, list_models, list_modules, model_entrypoint,
                       register_model)
from . import models  # noqa: F401  (registers the model zoo)
from .onnx_export import export_onnx
from .inference import optimize_for_inference

__version__ = "0.1.0"

__all__ = [
    "create_model", "list_models", "list_modules", "is_model", "model_entrypoint", "register_model",
    "get_model_cfg", "build_on_meta", "build_model_with_cfg", "ModelCfg", "FeatureInfo", "FeatureExtractWrapper",
    "get_feature_info", "load_checkpoint", "save_checkpoint", "LoadReport", "CheckpointError", "wrap", "discover",
    "export_onnx", "optimize_for_inference",
]
