"""featurezoo.atomic: every file featurezoo writes is replaced whole (temp file, fsync, rename, fsync of
the folder), and a failed write leaves the old file and no temporary file behind."""
import json
import os
import stat
import urllib.parse
from pathlib import Path

import pytest
import torch

import featurezoo as fz
from featurezoo.atomic import atomic_path, atomic_write, write_bytes_atomic, write_json_atomic
from featurezoo.checkpoint.hub import download
from featurezoo.checkpoint.io import read_state_dict, write_state_dict
from featurezoo.checkpoint.mindspore_ckpt import write_mindspore_ckpt
from featurezoo.extract import extract_features

REPO = Path(__file__).resolve().parents[1]


class FsyncLog:
    """Records every ``os.fsync`` (and ``os.replace``) in order, by inode, then does the real call."""

    def __init__(self, monkeypatch):
        self.events = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
            return real_fsync(fd)

        def replace(src, dst, **kw):
            real_replace(src, dst, **kw)
            self.events.append(("replace", os.stat(dst).st_ino))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def synced(self, path) -> bool:
        """``path``'s data was fsynced, and its folder fsynced after it was renamed into place."""
        ino, dir_ino = os.stat(path).st_ino, os.stat(os.path.dirname(os.path.abspath(path))).st_ino
        files = [i for i, e in enumerate(self.events) if e == ("file", ino)]
        renames = [i for i, e in enumerate(self.events) if e == ("replace", ino)]
        dirs = [i for i, e in enumerate(self.events) if e == ("dir", dir_ino)]
        return bool(files and renames and dirs) and files[0] < renames[-1] < dirs[-1]


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_atomic_write_replaces_and_fsyncs_file_then_folder(tmp_path, monkeypatch):
    log = FsyncLog(monkeypatch)
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new contents")
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
        temp = [p for p in listing(tmp_path) if p != "data.bin"]
        assert len(temp) == 1 and temp[0].startswith(".data.bin.") and temp[0].endswith(".tmp")
    assert target.read_bytes() == b"new contents"
    assert listing(tmp_path) == ["data.bin"]
    assert log.synced(target)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # as open() creates it, not mkstemp's 0600


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "data.json"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            raise error("boom")
    assert target.read_text() == "old" and listing(tmp_path) == ["data.json"]
    new = tmp_path / "new.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(new):
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["data.json"]  # a file that did not exist is not created


def test_atomic_path_for_writers_that_take_a_name(tmp_path, monkeypatch):
    log = FsyncLog(monkeypatch)
    target = tmp_path / "w.bin"
    with atomic_path(target) as tmp:
        assert Path(tmp).parent == tmp_path and tmp != str(target)
        Path(tmp).write_bytes(b"x" * 10)
    assert target.read_bytes() == b"x" * 10 and listing(tmp_path) == ["w.bin"] and log.synced(target)
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"partial")
            raise ValueError("boom")
    assert target.read_bytes() == b"x" * 10 and listing(tmp_path) == ["w.bin"]


def test_helpers_and_errors(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    assert (tmp_path / "a.json").read_text().endswith("\n")
    with pytest.raises(TypeError):  # not serialisable: the old file stays
        write_json_atomic(tmp_path / "a.json", {"k": object()})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    write_bytes_atomic(tmp_path / "b", b"\x00\x01")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert listing(tmp_path) == ["a.json", "b"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "c", "ab"):
            pass
    with pytest.raises(FileNotFoundError) as e:  # names the file asked for, not a temporary one
        write_bytes_atomic(tmp_path / "missing" / "c", b"")
    assert e.value.filename == str(tmp_path / "missing" / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):  # a folder is never replaced by a file
        write_bytes_atomic(tmp_path / "d", b"")
    assert (tmp_path / "d").is_dir() and listing(tmp_path) == ["a.json", "b", "d"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_checkpoint_writers_are_atomic(tmp_path, monkeypatch, suffix):
    log = FsyncLog(monkeypatch)
    path = tmp_path / f"w{suffix}"
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(4)}
    write_state_dict(tensors, path)
    assert log.synced(path) and listing(tmp_path) == [path.name]
    assert torch.equal(read_state_dict(path)["a.weight"], tensors["a.weight"])
    old = path.read_bytes()

    if suffix == ".pt":
        def broken_save(obj, f, *a, **k):
            f.write(b"PK partial")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", broken_save)
        bad = tensors
    elif suffix == ".safetensors":
        import safetensors.torch

        def broken_save_file(t, filename, *a, **k):
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")

        monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
        bad = tensors
    else:  # the writer fails on the second entry, after writing the first
        bad = {"a.weight": tensors["a.weight"], "bad": torch.zeros(2, dtype=torch.complex64)}
    with pytest.raises((OSError, TypeError)):
        write_state_dict(bad, path)
    assert path.read_bytes() == old and listing(tmp_path) == [path.name]


def test_mindspore_writer_and_save_checkpoint(tmp_path, monkeypatch):
    log = FsyncLog(monkeypatch)
    path = tmp_path / "m.ckpt"
    write_mindspore_ckpt({"x": torch.ones(3)}, path, crc=True)
    assert log.synced(path) and listing(tmp_path) == ["m.ckpt"]
    model = fz.create_model("resnet18", features_only=True, out_indices=[1])
    fz.save_checkpoint(model, tmp_path / "sub" / "m.safetensors")
    assert log.synced(tmp_path / "sub" / "m.safetensors") and listing(tmp_path / "sub") == ["m.safetensors"]


def test_download_cache_is_atomic_and_logs_progress_without_tqdm(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)
    log = FsyncLog(monkeypatch)
    src = tmp_path / "src" / "weights.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3 << 20))
    url = "file://" + urllib.parse.quote(str(src))
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="featurezoo"):
        dest = download(url, cache / "weights.bin")
    assert dest.read_bytes() == src.read_bytes() and listing(cache) == ["weights.bin"] and log.synced(dest)
    messages = [r.getMessage() for r in caplog.records]
    assert any("downloading weights.bin" in m for m in messages) and any("downloaded weights.bin" in m for m in messages)
    # a download whose hash does not match its name is discarded: nothing at dest, no temporary file
    with pytest.raises(fz.CheckpointError, match="is corrupt"):
        download(url, cache / "weights-deadbeef.bin", progress=False)
    assert listing(cache) == ["weights.bin"]


def test_extraction_store_is_written_atomically(tmp_path, monkeypatch):
    from tests.test_extract import write_good_images

    write_good_images(tmp_path / "images", 3)
    log = FsyncLog(monkeypatch)
    out = tmp_path / "out"
    extract_features("resnet18", [tmp_path / "images"], out, out_indices=[1], size=(32, 32), batch_size=2,
                     workers=0)
    shards = sorted((out / "shards").iterdir())
    assert [p.name for p in shards] == ["000000.safetensors", "000001.safetensors"]
    for path in [out / "meta.json", out / "inputs.json", *shards]:
        assert log.synced(path), path
    assert sorted(listing(out)) == [".lock", "index.jsonl", "inputs.json", "meta.json", "shards"]


def test_no_other_temp_and_rename_writers():
    """One implementation of temp-file-and-rename: featurezoo/atomic.py."""
    offenders = []
    for path in sorted((REPO / "featurezoo").rglob("*.py")):
        if path.name == "atomic.py" and path.parent.name == "featurezoo":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("os.replace(", "os.rename(", "mkstemp(", "NamedTemporaryFile("):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert not offenders, offenders
