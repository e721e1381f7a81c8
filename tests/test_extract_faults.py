"""Extraction under faults: a kill at every write step and at random times, two runs on one OUT at
once, damaged outputs, sizes and images too large.

Every case must end in the complete output of an uninterrupted run (bit-identical shards, index and
inputs list) after a rerun, or in a refusal naming the file and the remedy; ``load_features`` never
returns part of the rows as complete.

Runs are killed with the store's fault points (``FEATUREZOO_FAULT=STEP:N``, see
:mod:`featurezoo.extract.store`) in forked children of this process (no interpreter start per run: a run of resnet18 at 32 px
over 5 inputs takes 0.3 CPU-seconds), and with SIGKILLs at seeded random times. ``tests/test_cli.py`` kills a real ``python -m featurezoo extract`` and resumes it.
"""
import fcntl
import json
import logging
import os
import random
import re
import shutil
import signal
import time
import traceback
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurezoo import atomic
from featurezoo.cli import main
from featurezoo.extract import ExtractError, Preprocess, SkippedImage, extract_features, iter_shards, load_features
from featurezoo.extract import run as run_module
from featurezoo.extract.plan import MAX_SIZE
from tests.test_extract import write_good_images

MODEL = "resnet18"
# 5 inputs (one not an image), batches of 2: 3 batches, each with a shard; one thread, so that every run's
# floats are the same.
RUN = dict(out_indices=[2, 4], size=(32, 32), batch_size=2, workers=0, threads=1)
N_INPUTS, N_BATCHES = 5, 3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault_images")
    write_good_images(folder, 4)
    (folder / "img_01b.bak").write_text("not an image\n")  # in batch 1, with img_02.png
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The output of an uninterrupted run."""
    out = tmp_path_factory.mktemp("fault_ref") / "out"
    extract_features(MODEL, [images], out, **RUN)
    return out


def _files(out: Path):
    """What must be bit-identical to an uninterrupted run's: the inputs, the index, the shards."""
    names = ["inputs.json", "index.jsonl", *sorted(f"shards/{p.name}" for p in (out / "shards").iterdir())]
    return {name: (out / name).read_bytes() for name in names}


def assert_same_as(out: Path, reference: Path):
    assert _files(out) == _files(reference)
    meta, ref = (json.loads((p / "meta.json").read_text()) for p in (out, reference))
    assert meta["settings"] == ref["settings"] and meta["status"] == ref["status"]
    assert load_features(out).complete
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no temporary file left


def _fork(fn):
    """Run ``fn()`` in a forked child; return its pid and a pipe end that yields its outcome."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            atomic._fault_counts.clear()
            torch.set_num_threads(1)
            message = repr(fn())
        except BaseException as e:  # noqa: B902 - reported to the parent
            message, code = f"{type(e).__name__}: {e}", 1
            if not isinstance(e, ExtractError):
                message += "\n" + traceback.format_exc()
        os.write(w, message.encode()[:60000])
        os._exit(code)
    os.close(w)
    return pid, r


def _wait(pid, r):
    """``(status, message)``: status is the exit code, or ``-signal`` when killed."""
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), message


def _extract_in_child(images, out, fault=None, **kwargs):
    def go():
        if fault:
            os.environ[atomic.FAULT_ENV] = fault
        return extract_features(MODEL, [images], out, **{**RUN, **kwargs}).new_images
    return _wait(*_fork(go))


def assert_partial_is_honest(out: Path, reference: Path):
    """After a kill: what can be read is a prefix of the reference rows, never called complete unless it
    is all of them; or a refusal naming the file."""
    try:
        feats = load_features(out)
    except ExtractError as e:
        assert "meta.json missing" in str(e) and "run the extraction again" in str(e), e
        return
    ref = load_features(reference)
    n = len(feats.paths)
    assert feats.paths == ref.paths[:n] and feats.complete == (n == len(ref.paths) and feats.skipped == ref.skipped)
    for name, t in feats.levels.items():
        assert torch.equal(t, ref.levels[name][:n])


# -- a kill at every write step -----------------------------------------------------------------------
# Each point as reached by a new run: 1 write of inputs.json and of the empty index, 2 of meta.json (at the
# start and the end), a shard per batch (3) and an append per batch.
KILL_POINTS = [
    "inputs.begin:1", "inputs.data:1", "inputs.rename:1",
    "index.begin:1", "index.data:1", "index.rename:1",
    "meta.begin:1", "meta.data:1", "meta.rename:1",
    "shard.begin:1", "shard.partial:1", "shard.data:1", "shard.rename:1",
    "append.before:1", "append.after:1",
    "shard.partial:2", "shard.rename:3", "append.before:3", "append.after:3",
    "meta.begin:2", "meta.data:2", "meta.rename:2",
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_every_write_step_then_rerun(tmp_path, images, reference, point):
    out = tmp_path / "out"
    status, message = _extract_in_child(images, out, fault=point)
    assert status == -signal.SIGKILL, f"{point} was never reached: {message}"
    assert_partial_is_honest(out, reference)
    summary = extract_features(MODEL, [images], out, **RUN)
    assert summary.complete
    assert_same_as(out, reference)


@pytest.mark.parametrize("first, second", [
    ("append.after:2", "meta.data:1"),  # killed again while resuming: the resume's own meta.json write
    ("shard.data:2", "shard.partial:1"),  # ... while writing its first shard
    ("append.after:3", "meta.rename:1"),  # every batch done, killed before the end was recorded; then again
])
def test_kill_during_a_resume(tmp_path, images, reference, first, second):
    out = tmp_path / "out"
    for point in (first, second):
        status, message = _extract_in_child(images, out, fault=point)
        assert status == -signal.SIGKILL, f"{point} was never reached: {message}"
        assert_partial_is_honest(out, reference)
    extract_features(MODEL, [images], out, **RUN)
    assert_same_as(out, reference)


def test_kill_during_overwrite(tmp_path, images, reference):
    """--overwrite removes meta.json first: killed after that, what is left is a new run's garbage."""
    out = tmp_path / "out"
    extract_features(MODEL, [images], out, **{**RUN, "pool": "avg"})
    status, message = _extract_in_child(images, out, fault="overwrite:1", overwrite=True)
    assert status == -signal.SIGKILL, message
    extract_features(MODEL, [images], out, **RUN)  # no --overwrite needed any more: nothing of the old run counts
    assert_same_as(out, reference)


def test_kill_at_random_times(tmp_path, images, reference):
    """SIGKILL at seeded random moments of a run (and of its resumes), until a rerun finishes."""
    rng = random.Random(15)
    t0 = time.perf_counter()
    extract_features(MODEL, [images], tmp_path / "timing", **RUN)
    span = time.perf_counter() - t0
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        for _ in range(2):  # killed, then killed again while resuming
            pid, r = _fork(lambda: extract_features(MODEL, [images], out, **RUN).new_images)
            time.sleep(rng.uniform(0.05, 1.2) * span)
            os.kill(pid, signal.SIGKILL)
            _wait(pid, r)
            assert_partial_is_honest(out, reference)
        extract_features(MODEL, [images], out, **RUN)
        assert_same_as(out, reference)


# -- two runs on one OUT at once ------------------------------------------------------------------------
def _other_run_in_the_window(monkeypatch, images, out, **other):
    """Run a whole other extraction between this run's first look at OUT and its lock (where it builds its model)."""
    real = run_module.build_feature_model

    def build(*args, **kwargs):
        monkeypatch.setattr(run_module, "build_feature_model", real)
        extract_features(MODEL, [images], out, **{**RUN, **other})
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "build_feature_model", build)


def test_other_settings_finishing_first_are_not_resumed_or_mixed(tmp_path, images, monkeypatch):
    out = tmp_path / "out"
    _other_run_in_the_window(monkeypatch, images, out, pool="avg")
    with pytest.raises(ExtractError, match=r"different settings: pool was \"avg\", this run asks \"none\""):
        extract_features(MODEL, [images], out, **RUN)
    feats = load_features(out)  # the first run's output, untouched
    assert feats.complete and feats.meta["settings"]["pool"] == "avg" and len(feats.meta["runs"]) == 1
    assert [tuple(t.shape) for t in feats.levels.values()] == [(4, 128), (4, 512)]


def test_same_settings_finishing_first_are_found_done(tmp_path, images, reference, monkeypatch):
    out = tmp_path / "out"
    _other_run_in_the_window(monkeypatch, images, out)
    summary = extract_features(MODEL, [images], out, **RUN)
    assert (summary.new_images, summary.images, summary.complete) == (0, 4, True)
    assert_same_as(out, reference)


def test_a_busy_out_with_other_settings_names_the_difference(tmp_path, images, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ExtractError, match="different settings: pool was"):
            extract_features(MODEL, [images], out, **{**RUN, "pool": "max"})
        (out / "index.jsonl").write_bytes(b"")  # unfinished, same settings: busy
        with pytest.raises(ExtractError, match="being written by another featurezoo process; wait for it"):
            extract_features(MODEL, [images], out, **RUN)


@pytest.mark.parametrize("other", [{}, {"pool": "avg"}], ids=["same-settings", "other-settings"])
def test_two_processes_started_together(tmp_path, images, reference, other):
    out = tmp_path / "out"
    go_r, go_w = os.pipe()

    def run(**kwargs):
        def go():
            os.read(go_r, 1)  # both wait here, then start together
            return extract_features(MODEL, [images], out, **{**RUN, **kwargs}).new_images
        return go

    children = [_fork(run()), _fork(run(**other))]
    os.write(go_w, b"xx")
    results = [_wait(pid, r) for pid, r in children]
    os.close(go_r)
    os.close(go_w)
    won = [i for i, (status, _) in enumerate(results) if status == 0]
    refused = [message for status, message in results if status != 0]
    assert won, results
    for message in refused:
        assert message.startswith("ExtractError") and re.search(
            r"another featurezoo process; wait for it|different settings: pool was", message), message
    if not other:
        assert_same_as(out, reference)
        assert sum(int(results[i][1]) for i in won) == 4  # the rows were computed once
    else:
        assert len(won) == 1  # the loser is refused, whichever got there first
        feats = load_features(out)
        assert feats.complete and feats.meta["settings"]["pool"] == ("none" if won == [0] else "avg")
        if won == [0]:
            assert_same_as(out, reference)


# -- damaged outputs --------------------------------------------------------------------------------------
@pytest.fixture
def copy(tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


def _edit_meta(out, fn):
    meta = json.loads((out / "meta.json").read_text())
    fn(meta)
    (out / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "shards/000001.safetensors").unlink(),
     r"shards/000001\.safetensors is missing: the features are damaged; run the same extraction again .* "
     r"recomputes batch 1 and every batch after it"),
    (lambda out: os.truncate(out / "shards/000001.safetensors", os.path.getsize(out / "shards/000001.safetensors") - 9),
     r"shards/000001\.safetensors is cut short: \d+ bytes, its header says \d+: the features are damaged; run the "
     r"same extraction again"),
    (lambda out: os.truncate(out / "shards/000000.safetensors", 5),
     r"shards/000000\.safetensors is cut short or not a safetensors file \(5 bytes\).*recomputes batch 0"),
    (lambda out: (out / "index.jsonl").unlink(),
     r"index\.jsonl \(missing\) lists 0 of the 5 inputs, but .*meta\.json records the run complete"),
    (lambda out: (out / "index.jsonl").write_bytes(b"".join((out / "index.jsonl").read_bytes().splitlines(True)[:2])),
     r"index\.jsonl lists 2 of the 5 inputs, but .*meta\.json records the run complete: .* recomputes batch 1"),
    (lambda out: (out / "index.jsonl").write_bytes(
        (out / "index.jsonl").read_bytes().replace(b'"row": 1', b'"row": 0', 1)),
     r"index\.jsonl gives batch 0's rows as \[0, 0\], not 0 to 1: the features are damaged"),
], ids=["shard-deleted", "shard-truncated", "shard-header-cut", "index-deleted", "index-cut", "index-row-edited"])
def test_damaged_output_is_refused_then_repaired_by_a_rerun(copy, images, reference, damage, message, caplog):
    damage(copy)
    with pytest.raises(ExtractError, match=message):
        load_features(copy)
    with pytest.raises(ExtractError, match=message):
        list(iter_shards(copy))
    with caplog.at_level(logging.WARNING, logger="featurezoo.extract.store"):
        summary = extract_features(MODEL, [images], copy, **RUN)
    assert summary.complete and summary.new_images > 0
    if "shards/" in message:
        assert "safetensors" in caplog.text and "recomputing batch" in caplog.text
    assert_same_as(copy, reference)


@pytest.mark.parametrize("edit, message", [
    (lambda out: (out / "meta.json").write_text('{"format": "featurezoo-features", "sett'),
     r"meta\.json is unreadable \(.*\); rerun the extraction with --overwrite"),
    (lambda out: _edit_meta(out, lambda m: m["settings"].update(batch_size="2")),
     r"meta\.json is damaged: settings\.batch_size is '2', not a positive integer; rerun the extraction with "
     r"--overwrite"),
    (lambda out: _edit_meta(out, lambda m: m["settings"]["levels"][0].update(shape=[64, 4, 4])),
     r"shards/000000\.safetensors holds layer2 as F32 \[2, 4, 4, 128\], but the index and meta\.json say "
     r"F32 \[2, 4, 4, 64\] \(layout nhwc: N, H, W, C\)"),
    (lambda out: _edit_meta(out, lambda m: m.update(format_version=99)),
     r"meta\.json is format 'featurezoo-features' version 99, this featurezoo reads versions 1, 2; "
     r"rerun the extraction with --overwrite"),
], ids=["meta-not-json", "meta-batch-size", "meta-levels", "meta-version"])
def test_edited_meta_is_refused_naming_the_file(copy, images, reference, edit, message):
    edit(copy)
    with pytest.raises(ExtractError, match=message):
        load_features(copy)
    with pytest.raises(ExtractError, match=r"meta\.json|different settings"):
        extract_features(MODEL, [images], copy, **RUN)  # never resumed over
    extract_features(MODEL, [images], copy, overwrite=True, **RUN)
    assert_same_as(copy, reference)


def test_a_run_cut_short_reads_as_incomplete(copy, reference):
    """A torn last batch (a kill while appending) is not damage: the finished batches, called incomplete."""
    index = (copy / "index.jsonl").read_bytes()
    (copy / "index.jsonl").write_bytes(index[: index.index(b"\n", index.index(b"\n") + 1) + 12])  # into line 3
    _edit_meta(copy, lambda m: m["status"].update(complete=False))
    feats = load_features(copy)
    assert not feats.complete and len(feats.paths) == 2
    assert feats.paths == load_features(reference).paths[:2]


def test_a_temp_file_left_by_a_kill_before_the_first_meta_is_not_foreign(tmp_path, images, reference):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".meta.json.0123abcd.tmp").write_text('{"form')
    (out / "inputs.json").write_text("[]")
    with pytest.raises(ExtractError, match=r"meta\.json missing\); if a run into it was killed before it began, "
                                           r"run the extraction again"):
        load_features(out)
    extract_features(MODEL, [images], out, **RUN)
    assert_same_as(out, reference)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / ".meta.json.notours.tmp").write_text("x")  # not our temporary name: someone's
    with pytest.raises(ExtractError, match=r"holds no featurezoo features \(meta\.json missing; found "
                                           r"'\.meta\.json\.notours\.tmp'\)"):
        extract_features(MODEL, [images], tmp_path / "theirs", **RUN)


def test_ray_engine_records_a_run_found_done_under_the_lock(copy, images):
    """The Ray engine's loop, given nothing left to do (another run finished it), records that and starts no
    pipeline (``ray`` is never touched)."""
    from featurezoo.extract import ray_engine
    from featurezoo.extract.plan import check_arguments, list_inputs, prepare, resolve_device

    job = check_arguments(MODEL, [images], copy, device=resolve_device("cpu"), **{
        k: v for k, v in RUN.items() if k not in ("workers", "threads")})
    plan = prepare(job, list_inputs(job))
    done = plan.store.begin(versions={}, engine="ray")
    try:
        summary = ray_engine._run(None, plan, done, 1, 1.0, 0.0, 1, False, 1, None)
    finally:
        plan.store.close()
    assert (summary.new_images, summary.complete, summary.engine) == (0, True, "ray")
    assert json.loads((copy / "meta.json").read_text())["runs"][-1]["engine"] == "ray"


# -- sizes and images too large ----------------------------------------------------------------------------
def test_size_above_the_bound_is_refused_before_anything(tmp_path, images, capsys):
    out = tmp_path / "out"
    with pytest.raises(ExtractError, match=rf"size 100000x100000 is too large: at most {MAX_SIZE} pixels a side"):
        extract_features(MODEL, [images], out, **{**RUN, "size": (100000, 100000)})
    assert main(["extract", MODEL, str(images), "-o", str(out), "--size", f"{MAX_SIZE + 1}x64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"size {MAX_SIZE + 1}x64 is too large" in err[0]
    assert not out.exists()


def _png_bomb(path: Path, side: int) -> None:
    """A valid grayscale PNG of side x side zeros: 117 KB for 11000 x 11000 (121 megapixels)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    z = zlib.compressobj(9)
    rows = b"\0" * (side + 1) * 1000  # 1000 rows: a filter byte and `side` pixels each
    body = b"".join(z.compress(rows) for _ in range(side // 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_skipped_undecoded(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    _png_bomb(bomb, 11000)
    assert bomb.stat().st_size < 150_000
    from PIL import ImageFile

    def never(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    pre = Preprocess(size=(32, 32), resize=(36, 36), interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(SkippedImage, match=r"too large: 11000x11000 = 121,000,000 pixels, above the limit of "
                                           r"89,478,485 \(PIL\.Image\.MAX_IMAGE_PIXELS\); not decoded"):
        pre.load(bomb)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_counts_what_is_decoded(tmp_path, monkeypatch):
    """A JPEG that draft decoding reduces below the limit is decoded; the same pixels as PNG are not."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # Pillow itself refuses above twice that
    pixels = np.zeros((400, 600, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg")
    Image.fromarray(pixels).save(tmp_path / "big.png")
    pre = Preprocess(size=(32, 32), resize=(36, 36), interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    assert pre.load(tmp_path / "big.jpg").shape == (32, 32, 3)  # 1/8 draft: 75x50
    for name, p in (("big.png", pre), ("big.jpg", replace(pre, jpeg_draft=False))):
        with pytest.raises(SkippedImage, match=r"too large: 600x400 = 240,000 pixels, above the limit of 200,000"):
            p.load(tmp_path / name)


def test_fault_spec_must_be_well_formed(monkeypatch, tmp_path):
    monkeypatch.setenv(atomic.FAULT_ENV, "meta.data")
    with pytest.raises(ValueError, match="FEATUREZOO_FAULT='meta.data' is not valid: use STEP:N"):
        atomic.write_bytes_atomic(tmp_path / "x", b"", step="meta")
    assert not list(tmp_path.iterdir())


def test_every_row_of_the_readme_table_names_tests_that_exist():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### What happens when...", 1)[1].split("\n\n**", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| What you do")]
    assert len(rows) >= 10
    sources = {p.name: p.read_text() for p in Path(__file__).parent.glob("test_*.py")}
    for row in rows:
        names = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)(?:\[[^\]]*\])?`", row.rsplit("|", 2)[1])
        assert names, row
        for file, name in names:
            assert f"def {name}(" in sources[file or Path(__file__).name], (file, name)
