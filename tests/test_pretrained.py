"""pretrained=True: download into the cache (served from 127.0.0.1), checksum,
atomic placement, and a useful offline error."""
import dataclasses
import functools
import hashlib
import http.server
import threading

import pytest
import torch

import featurezoo as fz
from featurezoo.checkpoint import hub
from featurezoo.models import resnet


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREZOO_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "checkpoints"


def _publish(root, model, name="resnet18"):
    path = root / "tmp.safetensors"
    fz.save_checkpoint(model, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    final = root / f"{name}-{digest}.safetensors"
    path.rename(final)
    return final.name


def _with_url(monkeypatch, url):
    cfg = dataclasses.replace(resnet.default_cfgs["resnet18"], url=url)
    monkeypatch.setitem(resnet.default_cfgs, "resnet18", cfg)


def test_pretrained_downloads_once_into_cache(server, home, monkeypatch):
    root, base = server
    source = fz.create_model("resnet18")
    fname = _publish(root, source)
    _with_url(monkeypatch, f"{base}/{fname}")
    m = fz.create_model("resnet18", pretrained=True, features_only=True)
    assert (home / fname).is_file()
    assert torch.equal(m.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert [p.name for p in home.iterdir()] == [fname]  # no temporary left behind
    (root / fname).unlink()  # served no more: the cached copy is used
    fz.create_model("resnet18", pretrained=True)


def test_checksum_mismatch_is_refused_and_nothing_cached(server, home, monkeypatch):
    root, base = server
    fname = _publish(root, fz.create_model("resnet18"))
    bad = "resnet18-00000000.safetensors"
    (root / fname).rename(root / bad)
    _with_url(monkeypatch, f"{base}/{bad}")
    with pytest.raises(fz.CheckpointError, match="corrupt: neither SHA-256"):
        fz.create_model("resnet18", pretrained=True)
    assert not home.exists() or not list(home.iterdir())


def test_offline_error_names_url_and_cache_path(home, monkeypatch):
    url = "http://127.0.0.1:9/resnet18-1e65cd21.ckpt"
    _with_url(monkeypatch, url)
    with pytest.raises(fz.CheckpointError) as exc:
        fz.create_model("resnet18", pretrained=True)
    assert url in str(exc.value) and str(home / "resnet18-1e65cd21.ckpt") in str(exc.value)


def test_model_without_weights(monkeypatch):
    _with_url(monkeypatch, "")
    with pytest.raises(fz.CheckpointError, match="no published weights"):
        fz.create_model("resnet18", pretrained=True)


def test_cfg_carries_mindcv_url():
    assert resnet.default_cfgs["resnet50"].url.endswith("resnet50-e0733ab8.ckpt")
    assert hub.cached_path(resnet.default_cfgs["resnet50"].url).name == "resnet50-e0733ab8.ckpt"
