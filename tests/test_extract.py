"""featurezoo.extract: preprocessing, skipping, the output directory, resume, refusal to mix.

Tiny generated images and small models at 64 px keep this fast on 2 cores.
The kill-a-subprocess resume test is in test_cli.py.
"""
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import featurezoo as fz
from featurezoo.extract import (ExtractError, Preprocess, build_feature_model, choose_workers, collect_inputs,
                                extract_features, iter_shards, load_features)
from featurezoo.extract.data import ImageBatches, SkippedImage
from featurezoo.extract.run import Decoding, _Lanes, _threaded, _TimedThreads, choose_decoding

MODEL = "resnet18"
SIZE = (64, 64)
RUN = dict(out_indices="pyramid", size=SIZE, batch_size=3, workers=0)


# -- generated images ---------------------------------------------------------------------------------
def _pattern(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def write_good_images(folder: Path, n: int = 5, start: int = 0):
    """``n`` small RGB JPEGs/PNGs of different sizes and aspect ratios."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img_{i:02d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(_pattern(30 + 3 * i, 40 - 2 * i, i)).save(path)
        paths.append(path)
    return paths


def write_odd_images(folder: Path):
    """Images in every awkward mode that must work."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _pattern(36, 48, 7)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")  # L
    rgba = np.concatenate([rgb, np.full((36, 48, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    return sorted(folder.iterdir())


def write_bad_inputs(folder: Path):
    """Inputs that must be skipped with a reason, {name: reason fragment}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt.bak").write_text("not an image\n")
    good = folder / "_tmp.jpg"
    Image.fromarray(_pattern(40, 40, 1)).save(good)
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    good.unlink()
    os.symlink(folder / "does_not_exist.png", folder / "broken_link.png")
    os.mkfifo(folder / "pipe.png")
    return {"empty.jpg": "empty file", "notes.txt.bak": "not an image", "truncated.jpg": "corrupt image",
            "broken_link.png": "not found", "pipe.png": "not a regular file"}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 5)
    return folder


def _index(out):
    return [json.loads(line) for line in (Path(out) / "index.jsonl").read_text().splitlines()]


def _direct(model, paths, pre, batch_size, pool="none"):
    """The feature model called directly on the preprocessed images, batched as extraction batches them."""
    levels = None
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([torch.from_numpy(pre.load(p)) for p in paths[i:i + batch_size]])
            feats = model(pre.normalize(batch))
            if pool == "avg":
                feats = [f.mean(dim=(2, 3)) for f in feats]
            levels = [[] for _ in feats] if levels is None else levels
            for acc, f in zip(levels, feats):
                acc.append(f)
    return [torch.cat(acc) for acc in levels]


# -- preprocessing ------------------------------------------------------------------------------------
def test_preprocess_follows_the_cfg():
    cfg = fz.create_model(MODEL).default_cfg
    pre = Preprocess.from_cfg(cfg)
    assert pre.size == tuple(cfg.input_size[1:]) and pre.resize == (256, 256)  # 224 / crop_pct 0.875
    assert pre.mean == cfg.mean and pre.std == cfg.std and pre.interpolation == cfg.interpolation
    assert Preprocess.from_cfg(cfg, size=(64, 96)).resize == (73, 109)


def test_preprocess_is_resize_then_centre_crop():
    """One resize(box=) call equals resizing the shorter side then cropping the centre."""
    pre = Preprocess.from_cfg(fz.create_model(MODEL).default_cfg, size=(48, 48), jpeg_draft=False)
    src = Image.fromarray(_pattern(90, 150, 3))
    ours = pre.apply(src.copy()).astype(int)
    rh = pre.resize[0]  # shorter side (90) -> 54, longer side 150 -> 90
    resized = src.resize((round(150 * rh / 90), rh), Image.Resampling.BILINEAR)
    left, top = int(round((resized.width - 48) / 2)), int(round((resized.height - 48) / 2))
    ref = np.asarray(resized.crop((left, top, left + 48, top + 48))).astype(int)
    assert ours.shape == (48, 48, 3)
    assert np.abs(ours - ref).mean() < 2.0


def test_normalize_uses_mean_and_std():
    pre = Preprocess.from_cfg(fz.create_model(MODEL).default_cfg, size=(4, 4))
    batch = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    x = pre.normalize(batch)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    expected = (1 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    assert pre.normalize(batch, torch.bfloat16).dtype == torch.bfloat16


def test_odd_image_modes_work(tmp_path):
    pre = Preprocess.from_cfg(fz.create_model(MODEL).default_cfg, size=(32, 32))
    for path in write_odd_images(tmp_path):
        arr = pre.load(path)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, path.name
    # 16-bit: scaled into 8 bits, not clipped to white
    gray16 = pre.load(tmp_path / "gray16.png")
    gray8 = pre.load(tmp_path / "gray.png")  # not the same channel: only compare the range
    assert 40 < gray16.mean() < 215 and gray8.std() > 0 and gray16.std() > 10


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise: the red half ends up on top
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    pre = Preprocess(size=(40, 40), resize=(40, 40), interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    arr = pre.load(tmp_path / "r.jpg").astype(int)
    assert arr[:15, :, 0].mean() > 200 and arr[:15, :, 1].mean() < 60  # top: red
    assert arr[-15:, :, 0].mean() < 60  # bottom: black


def test_jpeg_draft_decodes_big_jpegs_smaller(tmp_path):
    Image.fromarray(_pattern(400, 600, 0)).save(tmp_path / "big.jpg", quality=95)
    cfg = fz.create_model(MODEL).default_cfg
    fast = Preprocess.from_cfg(cfg, size=(64, 64)).load(tmp_path / "big.jpg").astype(int)
    exact = Preprocess.from_cfg(cfg, size=(64, 64), jpeg_draft=False).load(tmp_path / "big.jpg").astype(int)
    assert np.abs(fast - exact).mean() < 4  # same picture, a slightly different decoder path


def test_bad_inputs_have_reasons(tmp_path):
    pre = Preprocess.from_cfg(fz.create_model(MODEL).default_cfg, size=(32, 32))
    for name, reason in write_bad_inputs(tmp_path).items():
        with pytest.raises(SkippedImage, match=reason):
            pre.load(tmp_path / name)


# -- collecting inputs ---------------------------------------------------------------------------------------
def test_collect_inputs_sorted_recursive_deduplicated(tmp_path):
    write_good_images(tmp_path / "b", 2)
    write_good_images(tmp_path / "a" / "deep", 2)
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# a comment\n\nb/img_00.png\nmissing.jpg\n")
    paths = collect_inputs([tmp_path / "b", tmp_path / "a", tmp_path / "list.txt", tmp_path / "b" / "img_01.jpg"])
    expected = sorted(str(p) for p in [*(tmp_path / "b").iterdir(), *(tmp_path / "a" / "deep").iterdir(),
                                       tmp_path / "missing.jpg"])
    assert paths == expected
    with pytest.raises(ExtractError, match="does not exist"):
        collect_inputs([tmp_path / "nope"])


def test_batches_hold_the_sorted_inputs(tmp_path):
    paths = [str(p) for p in write_good_images(tmp_path, 5)]
    ds = ImageBatches(paths, 2, Preprocess.from_cfg(fz.create_model(MODEL).default_cfg, size=(16, 16)))
    assert len(ds) == 3
    k, batch, rows, skipped = ds[2]
    assert (k, tuple(batch.shape), rows, skipped) == (2, (1, 16, 16, 3), [4], [])


def test_a_batch_decoded_on_threads_equals_it_decoded_serially(tmp_path):
    """The probe batches of an automatic run are decoded on a thread pool: same pixels, rows and skipped inputs."""
    write_good_images(tmp_path, 6)
    reasons = write_bad_inputs(tmp_path)
    paths = collect_inputs([tmp_path])
    ds = ImageBatches(paths, len(paths), Preprocess.from_cfg(fz.create_model(MODEL).default_cfg, size=(16, 16)))
    serial = ds[0]
    with _TimedThreads(2) as pool:
        threaded = ds.decode(0, pool)
    assert len(serial[3]) == len(reasons) and len(serial[2]) == 6  # the bad inputs are among the batch
    assert threaded[0] == 0 and threaded[2:] == serial[2:]
    assert torch.equal(threaded[1], serial[1])
    assert pool.busy > 0


def test_auto_workers_decode_in_process_when_decoding_is_cheap():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_workers(0.06, cpu, cores=2) == 0  # resnet50 on 2 cores: workers cost more than they save
    assert choose_workers(0.8, cpu, cores=2) == 2  # mobilenet_v3_small: decoding dominates
    assert choose_workers(0.3, cpu, cores=16) == 1 and choose_workers(3.0, cpu, cores=16) == 5
    assert choose_workers(0.01, cuda, cores=16) == 1 and choose_workers(40.0, cuda, cores=16) == 15


def test_auto_decoding_on_a_cpu_runs_lanes_or_phased():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # resnet50: two lanes, each decoding its batch and running the model on half the threads
    assert choose_decoding(0.06, cpu, cores=2) == Decoding(0, 0, 1, lanes=2)
    assert choose_decoding(0.06, cpu, cores=2, model_threads=2) == Decoding(0, 0, 1, lanes=2)
    assert choose_decoding(0.1, cpu, cores=16, model_threads=8) == Decoding(0, 0, 4, lanes=2)
    assert choose_decoding(0.1, cpu, cores=16, model_threads=3) == Decoding(0, 0, 1, lanes=2)
    assert choose_decoding(0.1, cpu, cores=16, model_threads=1) == Decoding(0, 1, None)  # 1 thread asked: no lanes
    assert choose_decoding(0.8, cpu, cores=2) == Decoding(0, 2, None, phased=True)  # mobilenet_v3_small: all cores
    assert choose_decoding(9.0, cpu, cores=64) == Decoding(0, 16, None, phased=True)  # at most AUTO_MAX_WORKERS
    assert choose_decoding(2.5, cpu, cores=16, model_threads=8) == Decoding(0, 16, None, phased=True)
    assert choose_decoding(0.8, cpu, cores=1) == Decoding(0, 1, None)
    assert choose_decoding(0.01, cuda, cores=16) == Decoding(1, 0, None)  # GPU: processes, as choose_workers


def test_phased_decoding_stores_the_same_rows(tmp_path, images, monkeypatch):
    """An automatic run that decodes phased (each batch on a thread pool, then the model) stores the rows the
    model gives on the same batches, records the choice, and keeps no thread running after it."""
    from featurezoo.extract import run

    monkeypatch.setattr(run, "choose_decoding", lambda *a, **k: Decoding(0, 2, None, phased=True))
    out = tmp_path / "out"
    before = threading.active_count()
    extract_features(MODEL, [images], out, **{**RUN, "workers": None, "batch_size": 1})
    assert threading.active_count() == before
    feats = load_features(out)
    last = feats.meta["runs"][-1]
    assert (last["decode_phased"], last["decode_threads"], last["workers"]) == (True, 2, 0)
    model = build_feature_model(MODEL, "pyramid")
    want = _direct(model, feats.paths, Preprocess.from_cfg(model.default_cfg, SIZE), 1)
    for got, w in zip(feats.levels.values(), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


# -- extraction ----------------------------------------------------------------------------------------------
def test_rows_equal_the_feature_model_on_the_same_tensors(tmp_path, images):
    """With a checkpoint: stored rows == the model loaded from it, called on the same preprocessed batches."""
    ckpt = tmp_path / "w.safetensors"
    torch.manual_seed(123)
    fz.save_checkpoint(fz.create_model(MODEL, features_only=True), ckpt)
    out = tmp_path / "out"
    summary = extract_features(MODEL, [images], out, checkpoint_path=ckpt, **RUN)
    assert (summary.images, summary.skipped, summary.complete) == (5, 0, True)
    feats = load_features(out)
    assert feats.paths == sorted(str(p) for p in images.iterdir())
    model = build_feature_model(MODEL, "pyramid", checkpoint_path=ckpt)
    pre = Preprocess.from_cfg(model.default_cfg, SIZE)
    expected = _direct(model, feats.paths, pre, RUN["batch_size"])
    assert list(feats.levels) == model.feature_info.module_name()
    for got, want in zip(feats.levels.values(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    meta = feats.meta
    assert meta["settings"]["weights"]["source"] == "checkpoint"
    assert meta["settings"]["levels"][0]["shape"] == list(expected[0].shape[1:])
    assert {"torch", "pillow", "featurezoo", "safetensors"} <= set(meta["versions"])


def _stored_shapes(out, k=0):
    with safe_open(str(Path(out) / "shards" / f"{k:06d}.safetensors"), framework="pt") as f:
        return {key: f.get_slice(key).get_shape() for key in f.keys()}


@pytest.mark.parametrize("eager", [False, True], ids=["inference", "eager"])
@pytest.mark.parametrize("layout", [None, "nhwc", "nchw"])
def test_layout_stores_maps_nhwc_by_default_and_loads_them_nchw(tmp_path, images, layout, eager):
    """Maps are stored (N, H, W, C) by default or when asked, (N, C, H, W) with layout 'nchw', from the inference
    path's channels-last maps and from the eager model's C-order ones alike; load_features returns (N, C, H, W)
    rows equal to the model's either way (nhwc: as channels-last views), and meta.json records the layout."""
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, layout=layout, eager=eager, **{**RUN, "out_indices": [1, 4]})
    feats = load_features(out)
    settings = feats.meta["settings"]
    assert feats.meta["format_version"] == 2 and settings.get("layout", "nchw") == (layout or "nhwc")
    model = build_feature_model(MODEL, [1, 4], eager=eager)
    want = _direct(model, feats.paths, Preprocess.from_cfg(model.default_cfg, SIZE), RUN["batch_size"])
    stored = _stored_shapes(out)
    for (key, got), w in zip(feats.levels.items(), want):
        n, c, h, wd = w[:3].shape
        assert stored[key] == ([n, h, wd, c] if (layout or "nhwc") == "nhwc" else [n, c, h, wd])
        assert got.shape == w.shape
        assert got.is_contiguous(memory_format=torch.channels_last) == ((layout or "nhwc") == "nhwc")
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    for paths, levels in iter_shards(out):
        assert [tuple(t.shape[1:]) for t in levels.values()] == [tuple(w.shape[1:]) for w in want]


def test_a_version_1_directory_resumes_in_its_own_layout(tmp_path, images):
    """A run cut short by an older featurezoo (format version 1, maps stored (N, C, H, W), no layout named) is
    resumed as it is: its remaining shards are NCHW too, and the rows are those of an uninterrupted run. Asking
    for nhwc against it is refused, naming the setting, and changes nothing."""
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, layout="nchw", **RUN)
    want = load_features(out).levels
    meta = json.loads((out / "meta.json").read_text())
    assert "layout" not in meta["settings"]  # nchw is recorded by its absence, as version 1 did
    meta["format_version"] = 1
    meta["status"]["complete"] = False
    (out / "meta.json").write_text(json.dumps(meta))
    lines = (out / "index.jsonl").read_text().splitlines()
    (out / "index.jsonl").write_text("\n".join(lines[:RUN["batch_size"]]) + "\n")  # batch 0 only
    (out / "shards" / "000001.safetensors").unlink()
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ExtractError, match="different settings: layout"):
        extract_features(MODEL, [images], out, layout="nhwc", **RUN)
    assert sorted(p.name for p in out.rglob("*")) == before
    summary = extract_features(MODEL, [images], out, **RUN)
    assert summary.new_images == 5 - RUN["batch_size"]
    feats = load_features(out)
    assert "layout" not in feats.meta["settings"]
    stored = _stored_shapes(out, 1)
    assert all(stored[key][1:] == list(t.shape[1:]) for key, t in feats.levels.items())  # (C, H, W) rows
    for key, t in feats.levels.items():
        assert t.is_contiguous()
        torch.testing.assert_close(t, want[key], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layout="NHWC"), "layout 'NHWC' is not valid; use one of nhwc, nchw"),
    (dict(layout="nchw", pool="avg"), "layout 'nchw' is for unpooled maps; with pool 'avg'"),
])
def test_a_bad_layout_is_refused_before_anything_is_written(tmp_path, images, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(ExtractError, match=message):
        extract_features(MODEL, [images], out, **{**RUN, **kwargs})
    assert not out.exists()


def test_float16_store_holds_the_float32_rows_cast(tmp_path, images):
    """store_dtype: the model runs in float32, the shards hold float16; automatic decoding (after 2 probe batches)."""
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    extract_features(MODEL, [images], out, store_dtype="float16", **{**RUN, "out_indices": [1, 4], "workers": None,
                                                                      "batch_size": 2})
    assert torch.get_num_threads() == threads
    feats = load_features(out)
    last = feats.meta["runs"][-1]
    assert last["workers"] == 0 and (last["decode_threads"] >= 1) != (last["lanes"] == 2)  # threads, or lanes
    assert feats.meta["settings"]["dtype"] == "float32" and feats.meta["settings"]["store_dtype"] == "float16"
    with safe_open(str(out / "shards" / "000000.safetensors"), framework="pt") as f:
        assert f.get_slice(f.keys()[0]).get_dtype() == "F16"
    model = build_feature_model(MODEL, [1, 4])
    torch.set_num_threads(last["threads"])  # the model's threads in the run (in each lane, with lanes)
    try:
        want = _direct(model, feats.paths, Preprocess.from_cfg(model.default_cfg, SIZE), 2)
    finally:
        torch.set_num_threads(threads)
    for got, w in zip(feats.levels.values(), want):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, w.half(), rtol=0, atol=0)


class _SlowBatches:
    """A stand-in for ImageBatches whose batches take uneven times, recording which were started."""

    def __init__(self, delays):
        self.delays, self.started = delays, []

    def __getitem__(self, k):
        self.started.append(k)
        time.sleep(self.delays[k])
        return (k, None, [k], [])


def test_lanes_emit_in_batch_order_with_a_bound():
    """Lanes finish batches out of order (uneven decoding times); emit sees them in order, and no lane runs more
    than 2 * lanes batches ahead of the next one emitted."""
    batches = _SlowBatches([0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0])
    emitted, ahead = [], []

    def step(batch, rows):
        ahead.append(len(batches.started) - len(emitted))
        return {"k": rows[0]}

    lanes = _Lanes(batches, list(range(10)), 2, step, lambda k, outs, rows, skipped: emitted.append((k, outs["k"])))
    lanes.run()
    assert emitted == [(k, k) for k in range(10)]
    assert max(ahead) <= 4 and sorted(batches.started) == list(range(10))
    assert lanes.decode_s >= 0.07


@pytest.mark.parametrize("in_main", [True, False])
def test_a_failing_lane_stops_every_lane_and_raises(in_main):
    """The first error, in the calling thread's lane or another, is raised after every lane has stopped; no batch
    after the failed one is emitted, and no lane thread is left running."""
    batches = _SlowBatches([0.0] * 20)
    emitted = []
    main = threading.current_thread()

    def step(batch, rows):
        time.sleep(0.01)
        if rows[0] >= 3 and (threading.current_thread() is main) == in_main:
            raise OSError(f"disk full at {rows[0]}")
        return {}

    before = threading.active_count()
    with pytest.raises(OSError, match="disk full"):
        _Lanes(batches, list(range(20)), 2, step, lambda k, *rest: emitted.append(k)).run()
    assert threading.active_count() == before
    assert emitted == list(range(len(emitted))) and len(emitted) < 20 and len(batches.started) < 20


def test_lanes_store_the_rows_of_the_model(tmp_path, images, monkeypatch):
    """An automatic run in lanes stores, in order, the rows the model gives on the same batches (one torch thread
    per lane, as here), records the choice, restores the thread count and leaves no thread running."""
    from featurezoo.extract import run

    monkeypatch.setattr(run, "choose_decoding", lambda *a, **k: Decoding(0, 0, 1, lanes=2))
    out = tmp_path / "out"
    threads, before = torch.get_num_threads(), threading.active_count()
    extract_features(MODEL, [images], out, **{**RUN, "workers": None, "batch_size": 1})
    assert threading.active_count() == before and torch.get_num_threads() == threads
    feats = load_features(out)
    last = feats.meta["runs"][-1]
    assert (last["lanes"], last["threads"], last["decode_threads"], last["workers"]) == (2, 1, 0, 0)
    model = build_feature_model(MODEL, "pyramid")
    torch.set_num_threads(1)
    try:
        want = _direct(model, feats.paths, Preprocess.from_cfg(model.default_cfg, SIZE), 1)
    finally:
        torch.set_num_threads(threads)
    for got, w in zip(feats.levels.values(), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_decoding_threads_keep_batch_order_and_a_bound():
    batches = _SlowBatches([0.03, 0.0, 0.02, 0.0, 0.01, 0.0])
    with _threaded(batches, [1, 0, 2, 3, 4, 5], threads=3, depth=3) as items:
        got = [next(items)[0] for _ in range(2)]  # leave early: the rest is cancelled, not decoded
    assert got == [1, 0]
    assert len(batches.started) <= 5  # at most depth=3 batches ahead of the 2 taken
    with _threaded(batches, [5, 4, 3, 2, 1, 0], threads=3, depth=2) as items:
        assert [item[0] for item in items] == [5, 4, 3, 2, 1, 0]


def test_pooled_rows_and_dtype(tmp_path, images):
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, pool="avg", dtype="bfloat16", out_indices=[-2, -1], size=SIZE,
                     batch_size=2, workers=1)
    feats = load_features(out)
    assert [tuple(t.shape) for t in feats.levels.values()] == [(5, 256), (5, 512)]
    assert all(t.dtype == torch.bfloat16 for t in feats.levels.values())
    model = build_feature_model(MODEL, [-2, -1]).to(torch.bfloat16)
    pre = Preprocess.from_cfg(model.default_cfg, SIZE)
    with torch.inference_mode():
        batch = torch.stack([torch.from_numpy(pre.load(p)) for p in feats.paths[:2]])
        want = [f.mean(dim=(2, 3)) for f in model(pre.normalize(batch, torch.bfloat16))]
    for got, w in zip(feats.levels.values(), want):
        torch.testing.assert_close(got[:2], w, rtol=0, atol=0)


def test_unusable_inputs_are_skipped_counted_and_listed(tmp_path, images):
    reasons = write_bad_inputs(images)
    write_odd_images(images / "odd")
    out = tmp_path / "out"
    summary = extract_features(MODEL, [images], out, **RUN)
    assert summary.skipped == len(reasons) and summary.images == 5 + 5 and summary.complete
    index = _index(out)
    assert [r["path"] for r in index] == collect_inputs([images])  # every input, once, in order
    skipped = {Path(r["path"]).name: r["skipped"] for r in index if "skipped" in r}
    assert set(skipped) == set(reasons)
    for name, fragment in reasons.items():
        assert fragment in skipped[name]
    feats = load_features(out)
    assert len(feats.paths) == 10 and all(Path(p).name not in reasons for p in feats.paths)
    assert {Path(p).name for p, _ in feats.skipped} == set(reasons)
    assert all(t.shape[0] == 10 for t in feats.levels.values())


def test_index_rows_point_into_shards(tmp_path, images):
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, **RUN)
    index = _index(out)
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["000000.safetensors", "000001.safetensors"]  # 5 images, batch 3
    assert [(r["shard"], r["row"]) for r in index] == [("shards/000000.safetensors", 0),
                                                        ("shards/000000.safetensors", 1),
                                                        ("shards/000000.safetensors", 2),
                                                        ("shards/000001.safetensors", 0),
                                                        ("shards/000001.safetensors", 1)]
    with safe_open(str(out / "shards" / "000001.safetensors"), "pt") as f:
        assert f.get_tensor("layer4").shape[0] == 2
    assert [len(p) for p, _ in iter_shards(out)] == [3, 2]


def test_resume_repairs_a_torn_run(tmp_path, images):
    """What a kill can leave behind: a torn index line, a shard renamed but never indexed, a temp file."""
    write_good_images(images, 4, start=5)
    full = tmp_path / "full"
    extract_features(MODEL, [images], full, **{**RUN, "workers": None})  # auto: 2 batches timed in-process, then 1
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, **RUN)
    index = (out / "index.jsonl").read_bytes()
    lines = index.splitlines(keepends=True)
    (out / "index.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][:10])  # batch 1 incomplete, line torn
    (out / "shards" / ".000002.safetensors.123.tmp").write_bytes(b"partial")
    meta = json.loads((out / "meta.json").read_text())
    meta["status"]["complete"] = False
    (out / "meta.json").write_text(json.dumps(meta))
    summary = extract_features(MODEL, [images], out, **RUN)
    assert summary.resumed_batches == 1 and summary.new_images == 6 and summary.complete
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    assert (out / "index.jsonl").read_bytes() == (full / "index.jsonl").read_bytes()
    a, b = load_features(full), load_features(out)
    assert a.paths == b.paths and len(set(b.paths)) == 9
    for name in a.levels:
        assert torch.equal(a.levels[name], b.levels[name])


def test_a_finished_run_is_not_redone(tmp_path, images):
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, **RUN)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = extract_features(MODEL, [images], out, **RUN)
    assert (again.new_images, again.images, again.complete) == (0, 5, True)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before


@pytest.mark.parametrize("change, setting, stored", [
    (dict(pool="avg"), "pool", "avg"),
    (dict(out_indices=[1, 2]), "out_indices", [1, 2]),
    (dict(size=(48, 48)), "size", [48, 48]),
    (dict(dtype="bfloat16"), "dtype", "bfloat16"),
    (dict(batch_size=2), "batch_size", 2),
    (dict(store_dtype="float16"), "store_dtype", "float16"),
])
def test_different_settings_refuse_to_mix(tmp_path, images, change, setting, stored):
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, **RUN)
    index = (out / "index.jsonl").read_bytes()
    with pytest.raises(ExtractError, match=rf"different settings: {setting} was .*; rerun .* --overwrite"):
        extract_features(MODEL, [images], out, **{**RUN, **change})
    assert (out / "index.jsonl").read_bytes() == index
    summary = extract_features(MODEL, [images], out, overwrite=True, **{**RUN, **change})
    feats = load_features(out)
    assert summary.complete and len(feats.paths) == 5 and feats.meta["settings"][setting] == stored


def test_different_inputs_or_weights_refuse_to_mix(tmp_path, images):
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, **RUN)
    write_good_images(images, 1, start=7)
    with pytest.raises(ExtractError, match=r"inputs differ: 1 new \(e\.g\. .*img_07"):
        extract_features(MODEL, [images], out, **RUN)
    ckpt = tmp_path / "w.safetensors"
    fz.save_checkpoint(fz.create_model(MODEL, features_only=True), ckpt)
    with pytest.raises(ExtractError, match="different settings: weights"):
        extract_features(MODEL, [images / "img_00.png", images / "img_01.jpg", images / "img_02.png",
                                 images / "img_03.jpg", images / "img_04.png"], out, checkpoint_path=ckpt, **RUN)


def test_foreign_directory_is_never_used(tmp_path, images):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(ExtractError, match="holds no featurezoo features"):
            extract_features(MODEL, [images], out, overwrite=overwrite, **RUN)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_output_folder_inside_the_input_folder_is_not_an_input(tmp_path, images):
    extract_features(MODEL, [images], images / "feats", **RUN)
    summary = extract_features(MODEL, [images], images / "feats", **RUN)  # same inputs: not its own files
    assert summary.inputs == 5 and summary.complete


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_name="resnet_18"), "Unknown model 'resnet_18'; did you mean resnet18"),
    (dict(out_indices=[7]), "out_indices entry 7 is out of range"),
    (dict(out_indices=[1, 1]), "twice"),
    (dict(pool="mean"), "pool 'mean' is not valid"),
    (dict(dtype="float64"), "dtype 'float64' is not supported"),
    (dict(store_dtype="int8"), "store dtype 'int8' is not supported; valid: float32, float16, bfloat16"),
    (dict(decode_threads=-1), "decode_threads must be an integer >= 0"),
    (dict(batch_size=0), "batch size must be a positive integer"),
    (dict(checkpoint_path="nope.pt"), "checkpoint 'nope.pt' does not exist"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(inputs="EMPTY"), "no images found in"),
    (dict(inputs="TEXT"), "none of them an image"),
    (dict(out_dir="UNDER_FILE"), "is not a directory"),
])
def test_bad_arguments_write_nothing(tmp_path, images, kwargs, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.md").write_text("hello")
    special = {"EMPTY": [tmp_path / "empty"], "TEXT": [tmp_path / "text"], "UNDER_FILE": images / "img_00.png" / "o"}
    args = dict(model_name=MODEL, inputs=[images], out_dir=tmp_path / "out", **RUN)
    args.update({k: special.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=message):
        extract_features(args.pop("model_name"), args.pop("inputs"), args.pop("out_dir"), **args)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_second_writer_is_refused(tmp_path, images):
    import fcntl

    out = tmp_path / "out"
    extract_features(MODEL, [images], out, **RUN)
    (out / "index.jsonl").write_bytes(b"")  # make it look unfinished
    meta = json.loads((out / "meta.json").read_text())
    meta["status"]["complete"] = False
    (out / "meta.json").write_text(json.dumps(meta))
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ExtractError, match="another featurezoo process"):
            extract_features(MODEL, [images], out, **RUN)


# -- shard writing: O_DIRECT through a staging buffer, channels-last rows laid out without a full copy ----------
def _shard_tensors():
    gen = torch.Generator().manual_seed(3)
    return {
        "cl": torch.randn(3, 40, 33, 47, generator=gen).contiguous(memory_format=torch.channels_last),  # 0.7 MB
        "big": torch.randn(5, 600, 131, generator=gen),  # 1.5 MB, C order
        "half": torch.randn(2, 7, 5, 3, generator=gen).to(torch.float16).contiguous(memory_format=torch.channels_last),
        "empty": torch.zeros(0, 4),
        "vec": torch.arange(5, dtype=torch.float32),
        "odd": torch.randn(3, generator=gen).to(torch.float16),  # 6 bytes: what follows starts misaligned
        "cl2": torch.randn(2, 5, 4, 6, generator=gen).contiguous(memory_format=torch.channels_last),
    }


def _read_shard(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _expected_size(tensors, path):
    with open(path, "rb") as f:
        head = int.from_bytes(f.read(8), "little")
    return 8 + head + sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("how", ["direct", "direct, small staging buffer", "no O_DIRECT flag",
                                 "refused at the first write", "small: buffered"])
def test_shards_hold_the_tensors_in_c_order_whichever_way_they_are_written(tmp_path, monkeypatch, how):
    from featurezoo.extract import store

    tensors = _shard_tensors()
    if how == "small: buffered":
        tensors = {k: v for k, v in tensors.items() if k != "big"}
    used = []
    real_direct = store._write_direct
    monkeypatch.setattr(store, "_write_direct", lambda *a: used.append(real_direct(*a)) or used[-1])
    if how == "direct, small staging buffer":
        # 64 KB: "cl"'s 248 KB rows go through the row buffer, and most writes leave a part block behind
        monkeypatch.setattr(store, "_DIRECT_CHUNK", 64 << 10)
        monkeypatch.setattr(store, "_staging", threading.local())
    if how == "no O_DIRECT flag":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    elif how == "refused at the first write":
        real_write, calls = os.write, []

        def refuse_once(fd, data):
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(22, "Invalid argument")  # EINVAL, as a filesystem with other alignment rules
            return real_write(fd, data)
        monkeypatch.setattr(store.os, "write", refuse_once)
    path = tmp_path / "s.safetensors"
    store.write_safetensors(path, tensors, {"k": "v"}, step="shard")
    got = _read_shard(path)
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t.contiguous()), k
    assert path.stat().st_size == _expected_size(tensors, path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left
    if how.startswith("direct") and hasattr(os, "O_DIRECT"):
        # False only where the filesystem of tmp_path refuses O_DIRECT (tmpfs); ext4 here takes it
        assert used == [True] or (used == [False] and _on_tmpfs(tmp_path))
    elif how == "small: buffered":
        assert used == []
    else:
        assert used == [False]


def test_direct_writes_lay_channels_last_rows_out_in_the_staging_buffer(tmp_path):
    """Rows that fit are transposed straight into the O_DIRECT staging buffer: no row buffer is made."""
    from featurezoo.extract import store

    if not hasattr(os, "O_DIRECT") or _on_tmpfs(tmp_path):
        pytest.skip("needs a filesystem that takes O_DIRECT")  # (ext4 on the project's machines)
    t = torch.randn(6, 32, 40, 40).contiguous(memory_format=torch.channels_last)  # 1.2 MB
    seen = {}

    def write():
        store.write_safetensors(tmp_path / "s.safetensors", {"t": t}, {})
        seen["rows"] = getattr(store._staging, "rows", None)
    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert seen == {"rows": None}
    assert torch.equal(_read_shard(tmp_path / "s.safetensors")["t"], t.contiguous())


def test_channels_last_rows_reuse_one_buffer_per_thread(tmp_path):
    """The row buffer is allocated once per writer thread, at the largest row seen, not per shard."""
    from featurezoo.extract import store

    t = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    parts = list(bytes(p) for p in store._byte_parts(b"h", {"t": t}))
    assert parts[0] == b"h" and len(parts) == 5 and b"".join(parts[1:]) == t.contiguous().numpy().tobytes()
    buf = store._staging.rows
    list(store._byte_parts(b"h", {"t": t[:2]}))
    assert store._staging.rows is buf


def _on_tmpfs(path) -> bool:
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind = line.split()[:3]
            if str(Path(path).resolve()).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs")
