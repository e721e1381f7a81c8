"""Extract multi-scale features from image files into a resumable output directory.

>>> summary = extract_features("resnet18", ["photos/"], "feats/", out_indices="pyramid")  # doctest: +SKIP
>>> feats = load_features("feats/")                                                       # doctest: +SKIP
>>> feats.paths[0], {k: tuple(v.shape) for k, v in feats.levels.items()}                   # doctest: +SKIP
('/abs/photos/a.jpg', {'relu': (12, 64, 112, 112), 'layer1': (12, 64, 56, 56), ...})

Modules: :mod:`.data` (finding inputs, decoding, preprocessing), :mod:`.store`
(the output directory: shards, index, meta; and its readers), :mod:`.plan`
(what the engines share: checks, settings, summary), :mod:`.run`
(:func:`extract_features` and the local engine) and :mod:`.ray_engine`
(``engine="ray"``: the same run on a Ray cluster). Decoding needs Pillow, the
``cli`` extra (``pip install 'featurezoo[cli]'``); the Ray engine needs the
``ray`` extra (``pip install 'featurezoo[ray]'``), imported only when used.

Layer: application. Imports the library below it, never :mod:`featurezoo.cli`.
"""
from .data import (LIST_SUFFIXES, ExtractError, ImageBatches, PathLike, Preprocess, SkippedImage, collect_inputs,
                   looks_like_images)
from .plan import (DTYPES, POOLS, RANDOM_INIT_SEED, ExtractSummary, build_feature_model, pool_features,
                   probe_model, resolve_device, resolve_dtype, versions, weights_setting)
from .run import ENGINES, choose_workers, extract_features
from .store import FORMAT, FORMAT_VERSION, FeatureStore, Features, inputs_digest, iter_shards, load_features

__all__ = ["extract_features", "load_features", "iter_shards", "Features", "ExtractSummary", "ExtractError",
           "Preprocess", "SkippedImage", "ImageBatches", "collect_inputs", "looks_like_images", "build_feature_model",
           "probe_model", "weights_setting", "choose_workers", "pool_features", "resolve_dtype", "resolve_device",
           "versions", "FeatureStore", "inputs_digest", "FORMAT", "FORMAT_VERSION", "LIST_SUFFIXES", "PathLike",
           "POOLS", "DTYPES", "RANDOM_INIT_SEED", "ENGINES"]
