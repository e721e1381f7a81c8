"""ONNX export of feature models: one named output per level, a dynamic batch axis.

>>> export_onnx("resnet18", "resnet18.onnx", out_indices="pyramid")   # doctest: +SKIP
{'input': 'images', 'outputs': {'relu': (64, 2), 'layer1': (64, 4), ...}, ...}

The graph is captured by ``torch.export`` with a dynamic batch and translated by
PyTorch's ONNX exporter (``dynamo=True``, onnxscript; the TorchScript exporter is
deprecated since PyTorch 2.9). The batch axis is dynamic; the spatial size is
the export size (``size=``): MindSpore's ``same`` padding, position-embedding
resampling and window padding are computed for it. With a symbolic size
``torch.export`` fails on these models (measured with torch 2.14.1: resnet18
stops on an internal guard assertion about its stride-2 sizes,
efficientnet_b0 did not finish in 15 minutes), so featurezoo does not offer it. Export once per input size a
deployment uses. The file appears complete or not at all (written to a
temporary name and renamed).

Layer: the model layer (imports the factory and the feature contract); onnx,
onnxscript and onnxruntime are the optional extra ``featurezoo[onnx]``.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._optional import require
from .atomic import atomic_path
from .factory import create_model
from .features import FeatureExtractWrapper
from .freezing import probe_input_size

__all__ = ["export_onnx", "onnx_output_names", "INPUT_NAME"]

_logger = logging.getLogger(__name__)

INPUT_NAME = "images"



def onnx_output_names(model: FeatureExtractWrapper) -> list:
    """The ONNX output names of a feature model: its level names, with characters other than letters,
    digits, ``_`` ``.`` ``@`` ``-`` ``:`` replaced by ``_``."""
    return [re.sub(r"[^\w.@:-]", "_", n) for n in model.level_names]


def _name_outputs(graph: Any, names: Sequence[str]) -> None:
    """Name the graph's outputs ``names``; an internal value that already holds one of these names
    (the exporter names values after their ops: ``relu``, ``add_3``) is renamed first, so the
    graph stays in single static assignment form."""
    outputs = list(graph.outputs)
    if len(outputs) != len(names):
        raise RuntimeError(f"export_onnx: the graph has {len(outputs)} outputs for {len(names)} levels")
    wanted = set(names)
    for node in graph:
        for value in node.outputs:
            if value.name in wanted and value not in outputs:
                value.name = f"{value.name}__internal"
    for value in outputs:
        value.name = f"{value.name}__output"  # free every wanted name before assigning any
    for value, name in zip(outputs, names):
        value.name = name


def export_onnx(model: Union[str, nn.Module], path: Union[str, "os.PathLike[str]"], *,
                out_indices: Union[Sequence[int], str, None] = None, size: Optional[Tuple[int, int]] = None,
                batch_size: int = 2, checkpoint_path: str = "",
                pretrained: bool = False, opset: Optional[int] = None, optimize: bool = False,
                **kwargs: Any) -> Dict[str, Any]:
    """Export a feature model (or a registered name, built with ``features_only=True``) to ONNX.

    Args:
        model: a feature model (``create_model(..., features_only=True)``) or a model name.
        path: the ``.onnx`` file to write (replaced atomically).
        out_indices, checkpoint_path, pretrained, **kwargs: for a name, passed to :func:`create_model`.
        size: the example input's (H, W); default: a small size the model accepts (64 px, or its
            declared only size / minimum).
        batch_size: the example input's batch (the batch axis is dynamic anyway).
        opset: the ONNX opset (default: the exporter's).
        optimize: run onnxscript's graph optimiser on the file (constant folding, fusions). Off by default:
            onnxruntime optimises the graph when it loads it, and the pass costs seconds per model.

    Returns:
        ``{"input": name, "outputs": {name: (channels, stride)}, "size": (H, W), "program": the
        torch.export ExportedProgram (dynamic batch) the file was translated from}``.
    """
    require("onnxscript", "onnx", "featurezoo.onnx_export.export_onnx")
    if isinstance(model, str):
        model = create_model(model, features_only=True, out_indices=out_indices, checkpoint_path=checkpoint_path,
                             pretrained=pretrained, **kwargs)
    elif out_indices is not None or checkpoint_path or pretrained or kwargs:
        raise ValueError("export_onnx: out_indices, checkpoint_path, pretrained and model options apply to a "
                         "model name; build the model with them instead")
    if not isinstance(model, FeatureExtractWrapper):
        raise ValueError(f"export_onnx needs a feature model (create_model(..., features_only=True)), got "
                         f"{type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        # torch.export specialises a dimension of size 1, so the example batch must be at least 2.
        raise ValueError(f"export_onnx: batch_size must be an int >= 2, got {batch_size!r}")
    cfg = model.default_cfg
    if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in size)):
        raise ValueError(f"export_onnx: size must be (H, W) positive ints, got {size!r}")
    h, w = size if size is not None else probe_input_size(cfg)
    in_channels = cfg.input_size[0] if cfg is not None else 3
    path = os.fspath(path)
    if not path.endswith(".onnx"):
        raise ValueError(f"export_onnx: the output file must end in .onnx, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"export_onnx: the folder {folder!r} does not exist")

    names = onnx_output_names(model)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, in_channels, h, w)
    try:
        with torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1,
                                                                                             max=4096)},))
        with atomic_path(path) as tmp:
            onnx_program = torch.onnx.export(program, (x,), input_names=[INPUT_NAME], opset_version=opset,
                                             dynamo=True, external_data=False, verbose=False,
                                             optimize=optimize)
            _name_outputs(onnx_program.model.graph, names)
            onnx_program.save(tmp)
    finally:
        model.train(was_training)
    outputs = {n: (e["chs"], e["reduction"]) for n, e in zip(names, model.feature_info)}
    _logger.info("exported %s to %s: input %s (N, %d, %d, %d), outputs %s", model.model_name, path, INPUT_NAME,
                 in_channels, h, w, list(outputs))
    return {"input": INPUT_NAME, "outputs": outputs, "size": (h, w), "program": program}

