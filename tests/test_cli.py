"""The ``featurezoo`` command: every subcommand, one-line errors, kill-and-resume of ``python -m featurezoo``."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import featurezoo as fz
from featurezoo.cli import build_parser, main, parse_out_indices, parse_size
from featurezoo.extract import load_features
from tests.test_extract import write_bad_inputs, write_good_images

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--size", "64", "--batch-size", "3", "--workers", "0"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 5)
    return folder


def test_argument_parsers():
    assert parse_size("64") == (64, 64) and parse_size("64x96") == (64, 96)
    assert parse_out_indices("1,2,3") == [1, 2, 3] and parse_out_indices("-1") == [-1]
    assert parse_out_indices("pyramid") == "pyramid" and parse_out_indices("all") is None
    parse = build_parser().parse_args
    assert parse(["extract", "m", "x", "-o", "o"]).workers is None  # auto
    assert parse(["extract", "m", "x", "-o", "o", "--workers", "auto"]).workers is None
    assert parse(["extract", "m", "x", "-o", "o", "--workers", "0"]).workers == 0


def test_out_indices_space_separated_and_negative():
    parse = build_parser().parse_args
    base = ["extract", "m", "x", "-o", "o"]
    assert parse([*base, "--out-indices", "1", "2", "3"]).out_indices == [1, 2, 3]
    assert parse([*base, "--out-indices", "1,2,3"]).out_indices == [1, 2, 3]
    assert parse([*base, "--out-indices", "-1"]).out_indices == [-1]
    assert parse([*base, "--out-indices", "-1", "-2"]).out_indices == [-1, -2]
    assert parse([*base, "--out-indices", "-2,-1", "3"]).out_indices == [-2, -1, 3]
    assert parse([*base, "--out-indices=-1,-2"]).out_indices == [-1, -2]
    assert parse([*base, "--out-ind", "0", "-1"]).out_indices == [0, -1]  # argparse's unambiguous prefix
    assert parse([*base, "--out-indices", "all"]).out_indices is None
    # the indices end at the first item that is not one: INPUTs may follow
    args = parse(["extract", "m", "--out-indices", "1", "2", "photos", "-o", "o"])
    assert args.out_indices == [1, 2] and args.model == "m" and args.inputs == ["photos"]
    args = parse(["info", "--out-indices", "-1", "-2", "resnet18"])
    assert args.out_indices == [-1, -2] and args.model == "resnet18"
    assert parse(["extract", "m", "-o", "o", "--out-indices", "1", "--", "-1"]).inputs == ["-1"]


def test_out_indices_space_separated_extract(capsys, tmp_path, images):
    out = tmp_path / "out"
    code, _, err = run(capsys, "extract", "resnet18", images, "-o", out, "--out-indices", "-1", "-2", "--pool", "avg",
                       *SMALL)
    assert code == 0, err
    assert json.loads((out / "meta.json").read_text())["settings"]["out_indices"] == [4, 3]
    code, _, err = run(capsys, "extract", "resnet18", "--out-indices", "1", "2", images, "-o", tmp_path / "b", *SMALL)
    assert code == 0, err
    assert load_features(tmp_path / "b").meta["settings"]["out_indices"] == [1, 2]
    code, _, err = run(capsys, "info", "resnet18", "--size", "64", "--out-indices", "0", "-1", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unrecognized arguments: x" in err


def test_list(capsys):
    code, out, _ = run(capsys, "list", "resnet18", "--features-only")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["name", "params", "levels", "reductions", "pretrained"]
    row = next(ln.split() for ln in lines if ln.startswith("resnet18 "))
    params = sum(p.numel() for p in fz.create_model("resnet18", features_only=True).parameters())
    assert row == ["resnet18", f"{params / 1e6:.2f}M", "5", "2,4,8,16,32", "yes"]
    assert run(capsys, "list", "no_such_model*")[0] == 2


def test_info(capsys):
    code, out, _ = run(capsys, "info", "resnet18", "--size", "64x96")
    assert code == 0
    assert "input 3x64x96" in out and "mean (0.485, 0.456, 0.406)" in out and "crop_pct 0.875" in out
    rows = {ln.split()[1]: ln.split() for ln in out.splitlines() if re.match(r"\s*\d+\s+\w", ln)}
    assert rows["layer2"][2:5] == ["128", "8", "8x12"]  # channels, reduction, output H x W at 64x96
    layer2 = fz.create_model("resnet18", features_only=True, out_indices=[2])
    assert rows["layer2"][5] == f"{sum(p.numel() for p in layer2.parameters()) / 1e6:.2f}M"
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fz.create_model("resnet18", features_only=True).eval()(torch.zeros(1, 3, 64, 96))
    assert f"{counter.get_total_flops() / 1e9:.3f}" in next(ln for ln in out.splitlines() if ln.startswith("all"))
    assert "pyramid" in out and "classifier" in out


def test_extract_prints_a_summary(capsys, tmp_path, images):
    write_bad_inputs(images)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "extract", "resnet18", images, "-o", out, "--pyramid", *SMALL)
    assert code == 0, err
    assert re.search(r"done: 5 images, 5 skipped; 10 inputs in [\d.]+ s \([\d.]+ img/s, decoded in-process\)", stdout)
    assert "index.jsonl" in stdout and "randomly initialised" in err
    feats = load_features(out)
    assert len(feats.paths) == 5 and len(feats.skipped) == 5
    code, stdout, _ = run(capsys, "extract", "resnet18", images, "-o", out, "--pyramid", *SMALL)
    assert code == 0 and "already complete" in stdout


def test_negative_out_indices_and_pooling(capsys, tmp_path, images):
    out = tmp_path / "out"
    code, _, err = run(capsys, "extract", "resnet18", images, "-o", out, "--out-indices", "-2,-1", "--pool", "max",
                       "--dtype", "bfloat16", *SMALL)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["out_indices"] == [3, 4] and meta["settings"]["pool"] == "max"
    assert [tuple(t.shape) for t in load_features(out).levels.values()] == [(5, 256), (5, 512)]


def test_different_arguments_refuse_to_mix(capsys, tmp_path, images):
    out = tmp_path / "out"
    assert run(capsys, "extract", "resnet18", images, "-o", out, *SMALL)[0] == 0
    code, _, err = run(capsys, "extract", "resnet18", images, "-o", out, "--pool", "avg", *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'pool was "none", this run asks "avg"' in err and "--overwrite" in err
    code, _, err = run(capsys, "extract", "resnet18", images, "-o", out, "--pool", "avg", "--overwrite", *SMALL)
    assert code == 0 and load_features(out).meta["settings"]["pool"] == "avg"


@pytest.mark.parametrize("argv, message", [
    (["extract", "resnt18", "IMAGES", "-o", "OUT"], "Unknown model 'resnt18'; did you mean resnet18"),
    (["extract", "resnet18", "IMAGES", "-o", "OUT", "--out-indices", "5"], "out_indices entry 5 is out of range"),
    (["extract", "resnet18", "IMAGES", "-o", "OUT", "--out-indices", "a,b"], "out-indices must be"),
    (["extract", "resnet18", "IMAGES", "-o", "FILE/out"], "is not a directory"),
    (["extract", "resnet18", "EMPTY", "-o", "OUT"], "no images found in"),
    (["extract", "resnet18", "MISSING", "-o", "OUT"], "does not exist"),
    (["extract", "resnet18", "IMAGES", "-o", "OUT", "--size", "0"], "size must be"),
    (["extract", "resnet18", "IMAGES", "-o", "OUT", "--pool", "sum"], "invalid choice"),
    (["extract", "resnet18", "IMAGES", "-o", "OUT", "--device", "cuda:99"], "cuda"),
    (["extract", "resnet18", "IMAGES"], "required: -o/--out"),
    (["info", "resnet_18"], "did you mean resnet18"),
    (["plot", "resnet18", "FILE", "-o", "EMPTY"], "cannot write the plot to"),
    (["plot", "resnet18", "EMPTY/../nope.jpg", "-o", "PNG"], "not found"),
    (["bench", "resnet18", "--dtype", "int8"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, images, argv, message):
    (tmp_path / "empty").mkdir()
    subst = {"IMAGES": images, "OUT": tmp_path / "out", "EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing",
             "FILE": images / "img_00.png", "PNG": tmp_path / "p.png"}
    argv = [re.sub("|".join(subst), lambda m: str(subst[m.group(0)]), a) for a in argv]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], err
    assert "Traceback" not in err and out == ""
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_plot(capsys, tmp_path, images):
    png = tmp_path / "pyr.png"
    code, out, err = run(capsys, "plot", "resnet18", images / "img_01.jpg", "-o", png, "--size", "64")
    assert code == 0, err
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 200
    assert run(capsys, "plot", "mobilenet_v3_small_100", images / "img_00.png", "-o", png, "--mode", "mean",
               "--out-indices", "0,-1", "--size", "64")[0] == 0


def test_bench(capsys):
    code, out, err = run(capsys, "bench", "mobilenet_v3_small_100", "--size", "64", "--batch-size", "2",
                         "--repeats", "2", "--warmup", "1", "--pyramid")
    assert code == 0, err
    assert re.search(r"images/s\s+[\d.]+", out) and "latency / batch" in out and "peak memory" in out
    assert re.search(r"\d+ linears on oneDNN", out) and "float32 linears on the CPU: " in out


def test_demo(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", "--model", "resnet18")
    assert code == 0, err
    assert "== featurezoo info resnet18 ==" in out and "layer4" in out and "wrote" in out
    feats = load_features(tmp_path / "demo" / "features")
    assert feats.paths[0].endswith("grace_hopper.jpg") and len(feats.levels) == 5
    assert (tmp_path / "demo" / "pyramid.png").stat().st_size > 10_000


def test_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["extract", "--help"])
    assert e.value.code == 0 and "--pyramid" in capsys.readouterr().out
    assert main([]) == 2


def _shards_in_index(out):
    lines = (out / "index.jsonl").read_text().splitlines()
    return {json.loads(ln)["shard"] for ln in lines if ln.endswith("}") and '"shard"' in ln}


def test_killed_run_resumes_to_the_same_rows(tmp_path):
    """``python -m featurezoo extract`` is killed once its first shard is in the index, then run again."""
    images = tmp_path / "images"
    write_good_images(images, 16)
    write_bad_inputs(images)
    args = ["extract", "resnet50", str(images), "--size", "96", "--batch-size", "2", "--workers", "1",
            "--threads", "1", "--pyramid"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "featurezoo", *args, "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not (out / "index.jsonl").exists() or not _shards_in_index(out):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first shard never appeared"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its DataLoader worker
        proc.communicate()
    assert not json.loads((out / "meta.json").read_text())["status"]["complete"]
    for shard in _shards_in_index(out):  # the index never names a partial shard
        with safe_open(str(out / shard), "pt") as f:
            assert f.get_tensor("layer4").shape[0] == 2
    first = load_features(out)
    assert 0 < len(first.paths) < 16

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "done: 16 images, 5 skipped" in done.stdout and "from an earlier run" in done.stdout

    full = tmp_path / "full"  # the uninterrupted run, same settings (threads included)
    assert main([*args, "-o", str(full), "--quiet"]) == 0
    a, b = load_features(full), load_features(out)
    index = [json.loads(ln) for ln in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 21 and len({r["path"] for r in index}) == 21  # every input exactly once
    assert b.paths == a.paths and len(set(b.paths)) == 16 and b.skipped == a.skipped
    for name in a.levels:
        assert torch.equal(a.levels[name], b.levels[name]), name
