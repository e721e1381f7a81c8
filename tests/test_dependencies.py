"""Declared dependencies: the wheel's metadata, and a one-line error naming the extra when an optional
package (Pillow, matplotlib, tqdm: ``featurezoo[cli]``) is missing."""
import configparser
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser as EmailParser
from pathlib import Path

import pytest

from featurezoo._optional import MissingDependency, require
from featurezoo.cli import main
from featurezoo.extract import Preprocess, extract_features, load_features
from tests.test_extract import write_good_images

REPO = Path(__file__).resolve().parents[1]
CORE = {"torch", "numpy", "safetensors"}
CLI = {"pillow", "matplotlib", "tqdm"}
PILLOW_LINE = "featurezoo extract needs Pillow: pip install 'featurezoo[cli]'"


def _requirement(line: str):
    """``'Pillow; extra == "cli"'`` -> ('pillow', 'cli'); no marker -> (name, None)."""
    spec, _, marker = line.partition(";")
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1).lower().replace("_", "-")
    extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
    assert not marker.strip() or extra, f"unexpected marker in {line!r}"
    return name, extra.group(1) if extra else None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the sources (the working tree is left untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "featurezoo", src / "featurezoo", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("featurezoo-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _read(whl: Path, suffix: str) -> str:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if re.fullmatch(r"featurezoo-[^/]+\.dist-info/" + suffix, n)]
        return z.read(name).decode("utf-8")


def test_wheel_declares_core_and_cli_dependencies(wheel):
    meta = EmailParser().parsestr(_read(wheel, "METADATA"))
    reqs = [_requirement(r) for r in meta.get_all("Requires-Dist") or []]
    unconditional = {name for name, extra in reqs if extra is None}
    cli = {name for name, extra in reqs if extra == "cli"}
    assert unconditional == CORE
    assert cli == CLI
    assert "cli" in (meta.get_all("Provides-Extra") or []) and "test" in meta.get_all("Provides-Extra")
    assert ("featurezoo", "test") in reqs  # the test extra pulls in featurezoo[cli]
    assert {name for name, extra in reqs if extra == "detection"} == {"torchvision"}
    assert {name for name, extra in reqs if extra == "ray"} == {"ray"}  # ray[data]: Ray Data, for --engine ray
    assert any(r.startswith("ray[data]") and 'extra == "ray"' in r for r in meta.get_all("Requires-Dist"))


def test_wheel_declares_the_console_script_and_holds_the_packages(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_read(wheel, "entry_points.txt"))
    assert entry_points["console_scripts"]["featurezoo"].strip() == "featurezoo.cli:main"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for module in ("featurezoo/cli/__init__.py", "featurezoo/cli/extract.py", "featurezoo/extract/__init__.py",
                   "featurezoo/extract/run.py", "featurezoo/extract/plan.py", "featurezoo/extract/ray_engine.py",
                   "featurezoo/atomic.py", "featurezoo/_optional.py",
                   "featurezoo/__main__.py"):
        assert module in names, module
    assert "featurezoo/cli.py" not in names and not any(n.startswith("tests/") for n in names)


def test_require():
    assert require("json", "cli", "x").__name__ == "json"
    with pytest.raises(MissingDependency) as e:
        require("featurezoo_no_such_module.sub", "cli", "featurezoo plot", package="nothing")
    assert isinstance(e.value, ModuleNotFoundError)
    assert str(e.value) == "featurezoo plot needs nothing: pip install 'featurezoo[cli]'"


def test_missing_pillow_cli_says_which_extra_and_exits_2(tmp_path, monkeypatch, capsys):
    write_good_images(tmp_path / "images", 2)
    monkeypatch.setitem(sys.modules, "PIL", None)
    out = tmp_path / "out"
    code = main(["extract", "resnet18", str(tmp_path / "images"), "-o", str(out), "--size", "32"])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == ""
    assert err.strip().splitlines() == [PILLOW_LINE]
    assert not out.exists()
    code = main(["plot", "resnet18", str(tmp_path / "images" / "img_00.png"), "-o", str(tmp_path / "p.png")])
    assert code == 2
    assert capsys.readouterr().err.strip() == "featurezoo plot needs Pillow: pip install 'featurezoo[cli]'"
    assert main(["info", "resnet18", "--size", "32"]) == 0  # what does not decode images works without Pillow


def test_missing_pillow_library_api(tmp_path, monkeypatch):
    write_good_images(tmp_path / "images", 2)
    monkeypatch.setitem(sys.modules, "PIL", None)
    out = tmp_path / "out"
    with pytest.raises(ModuleNotFoundError, match=re.escape("needs Pillow: pip install 'featurezoo[cli]'")) as e:
        extract_features("resnet18", [tmp_path / "images"], out, size=(32, 32))
    assert isinstance(e.value, MissingDependency) and len(str(e.value).splitlines()) == 1
    assert not out.exists()
    from featurezoo.cfg import ModelCfg

    pre = Preprocess.from_cfg(ModelCfg(), size=(32, 32))  # no decoding, no Pillow needed
    with pytest.raises(MissingDependency, match="Pillow"):
        pre.load(tmp_path / "images" / "img_00.png")


def test_missing_matplotlib_plot_and_demo(tmp_path, monkeypatch, capsys):
    write_good_images(tmp_path / "images", 1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "p.png"
    assert main(["plot", "resnet18", str(tmp_path / "images" / "img_00.png"), "-o", str(png)]) == 2
    assert capsys.readouterr().err.strip() == "featurezoo plot needs matplotlib: pip install 'featurezoo[cli]'"
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err.strip() == "featurezoo demo needs matplotlib: pip install 'featurezoo[cli]'"
    assert not png.exists() and not (tmp_path / "demo").exists()


def test_missing_tqdm_extracts_without_a_progress_bar(tmp_path, monkeypatch, caplog):
    write_good_images(tmp_path / "images", 2)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with caplog.at_level(logging.WARNING, logger="featurezoo"):
        summary = extract_features("resnet18", [tmp_path / "images"], tmp_path / "out", size=(32, 32),
                                   out_indices=[1], workers=0, progress=True)
    assert summary.complete and len(load_features(tmp_path / "out").paths) == 2
    assert any("tqdm is not installed (pip install 'featurezoo[cli]')" in r.getMessage() for r in caplog.records)


RAY_LINE = "featurezoo extract --engine ray needs ray[data]: pip install 'featurezoo[ray]'"


def test_missing_ray_says_which_extra_and_writes_nothing(tmp_path, monkeypatch, capsys):
    write_good_images(tmp_path / "images", 2)
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "out"
    code = main(["extract", "resnet18", str(tmp_path / "images"), "-o", str(out), "--size", "32", "--engine", "ray"])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == "" and err.strip().splitlines() == [RAY_LINE]
    with pytest.raises(MissingDependency, match=re.escape(RAY_LINE)):
        extract_features("resnet18", [tmp_path / "images"], out, size=(32, 32), engine="ray")
    assert not out.exists()
    summary = extract_features("resnet18", [tmp_path / "images"], out, size=(32, 32), workers=0)  # local: no Ray
    assert summary.complete and summary.engine == "local"


def test_importing_featurezoo_never_imports_ray():
    """Ray is imported by the Ray engine when it runs, not by the package, the extraction library or the CLI."""
    code = ("import sys, featurezoo, featurezoo.extract, featurezoo.extract.ray_engine, featurezoo.cli; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
