"""``featurezoo extract --engine ray`` against a real two-node Ray cluster started here.

One module-scoped cluster serves every test: ``ray start --head`` on
127.0.0.1 and a second ``ray start --address`` node on the same machine, 1
CPU and 200 MB of object store each, token authentication with a token made
for this module, and PYTHONPATH set so that Ray's workers import this
checkout's featurezoo. Both are stopped at the end, also when a test fails
(each node is a process group of its own: killing the group ends its raylet,
GCS and workers, and only those). The tests run on one xdist worker (group
``ray``).

Every run that talks to the cluster is a ``python -m featurezoo`` subprocess:
Ray reads its authentication settings from the environment when it is first
imported, so each driver gets its own, and killing a driver is a real kill.
The rows are compared with the local engine's on the same inputs (good,
awkward and unusable files): same index file byte for byte (same batches,
shards, skip reasons, every input once, in order), rows within 1e-5 of each
level's largest magnitude.
"""
import fcntl
import json
import os
import pickle
import pty
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Set

import pytest

from featurezoo.cli import main
from featurezoo.extract import ExtractError, extract_features, load_features
from featurezoo.extract.data import PackedPaths
from featurezoo.extract.ray_engine import _check_resources, default_model_workers
from tests.test_extract import write_bad_inputs, write_good_images, write_odd_images

pytestmark = pytest.mark.xdist_group("ray")

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
MODEL = "resnet18"
# 29 inputs (19 good, 5 awkward, 5 unusable) in 15 batches of 2 at 128 px: long enough on one CPU that a
# kill after the first shard lands mid-run.
ARGS = ["--size", "128", "--batch-size", "2", "--pyramid"]
LOCAL = dict(size=(128, 128), batch_size=2, out_indices="pyramid", workers=0)


@dataclass
class Cluster:
    address: str
    env: Dict[str, str]  # what a driver (or node) of this cluster runs with
    sessions: Set[int]  # the process-group / session ids of the two nodes

    def processes(self, marker: str) -> List[int]:
        """PIDs of this cluster's processes whose command line contains ``marker`` (Ray names actors there)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getsid(int(entry)) not in self.sessions:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except (OSError, ProcessLookupError):
                continue
        return pids

    def extract(self, out: Path, images: Path, *extra: str, join: bool = True, **popen) -> subprocess.Popen:
        """``featurezoo extract --engine ray`` joining this cluster (or, ``join=False``, a Ray of its own)."""
        address = ["--ray-address", self.address] if join else []
        cmd = [sys.executable, "-m", "featurezoo", "extract", MODEL, str(images), "-o", str(out), *ARGS,
               "--engine", "ray", *address, *extra]
        return subprocess.Popen(cmd, env=self.env, cwd=REPO, text=True, start_new_session=True, **popen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="fzray", dir="/tmp")  # short: Ray's socket paths live under it
    # RAY_TMPDIR: every node's session files, and those of a Ray a driver starts itself, go under tmp
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_DEDUP_LOGS="0",
               RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=tmp)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    node = ["--num-cpus", "1", "--object-store-memory", str(200 * 2**20), "--disable-usage-stats", "--block"]
    nodes: List[subprocess.Popen] = []
    try:
        for args in (["--head", "--port", str(port), "--include-dashboard=false"],
                     ["--address", address]):
            log = open(os.path.join(tmp, f"node{len(nodes)}.log"), "w")
            nodes.append(subprocess.Popen([str(RAY), "start", "--node-ip-address", "127.0.0.1", *args, *node],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
            if len(nodes) == 1:
                _wait(lambda: _answers(port), 60, "the head node's GCS", tmp)
        cl = Cluster(address, env, {p.pid for p in nodes})
        _wait(lambda: _alive_nodes(cl) == 2, 90, "two alive nodes", tmp)
        yield cl
    finally:
        for p in nodes:
            _kill_group(p.pid)
        for p in nodes:
            p.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _alive_nodes(cl: Cluster) -> int:
    code = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % cl.address)
    out = subprocess.run([sys.executable, "-c", code], env=cl.env, capture_output=True, text=True, timeout=60)
    return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.split() else 0


def _wait(ready, seconds: float, what: str, tmp: str) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            logs = "".join(p.read_text()[-1500:] for p in sorted(Path(tmp).glob("node*.log")))
            raise RuntimeError(f"Ray test cluster: no {what} after {seconds} s\n{logs}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The inputs, and the local engine's uninterrupted run over them."""
    root = tmp_path_factory.mktemp("ray_inputs")
    images = root / "images"
    write_good_images(images, 19)
    write_odd_images(images / "odd")
    reasons = write_bad_inputs(images / "bad")
    out = root / "local"
    summary = extract_features(MODEL, [images], out, **LOCAL)
    assert summary.complete and summary.skipped == len(reasons)
    return images, out


def _same_as_local(out: Path, local: Path) -> None:
    assert (out / "index.jsonl").read_bytes() == (local / "index.jsonl").read_bytes()
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["i"] for r in index] == list(range(len(json.loads((local / "inputs.json").read_text()))))
    got, want = load_features(out), load_features(local)
    assert got.paths == want.paths and got.skipped == want.skipped
    for name, w in want.levels.items():
        assert got.levels[name].shape == w.shape
        assert (got.levels[name] - w).abs().max() <= 1e-5 * w.abs().max(), name
    assert not [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]  # no temporary files left
    assert got.meta["engine"] == "ray" and got.meta["runs"][-1]["engine"] == "ray"
    assert got.meta["runs"][-1]["ray"]["nodes"] == 2
    assert got.meta["settings"] == want.meta["settings"]


def _wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


def _indexed(out: Path) -> int:
    try:
        return len((out / "index.jsonl").read_bytes().splitlines())
    except FileNotFoundError:
        return 0


# -- against the cluster ---------------------------------------------------------------------------------
def test_a_killed_model_worker_is_replaced_and_rows_equal_the_local_engine(cluster, reference, tmp_path):
    """(a) SIGKILL the only model actor once the first shard is written: Ray restarts it, its batch runs
    again, and the output is the local engine's, every input once. Also: the progress bar (on a terminal)."""
    images, local = reference
    out = tmp_path / "out"
    master, slave = pty.openpty()  # a terminal for stderr, so the command shows its progress bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing 0 wide
    terminal: List[bytes] = []
    proc = cluster.extract(out, images, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    reader = threading.Thread(target=_drain, args=(master, terminal), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: (out / "shards").is_dir() and any((out / "shards").glob("0*.safetensors")), proc,
                  "a first shard")
        actors = cluster.processes("_ModelWorker")
        assert len(actors) == 1, actors
        os.kill(actors[0], signal.SIGKILL)
        assert _indexed(out) < 29, "the run was over before the kill"
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    err = b"".join(terminal).decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    assert actors[0] not in cluster.processes("_ModelWorker")
    _same_as_local(out, local)
    assert "img/s" in err and "extract" in err  # tqdm's bar
    assert "done: 24 images, 5 skipped; 29 inputs in" in stdout and "ray: 1 model worker on 2 nodes)" in stdout


def _drain(fd: int, into: List[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        into.append(chunk)
    os.close(fd)


def test_a_killed_driver_resumes_to_the_uninterrupted_rows(cluster, reference, tmp_path):
    """(b) SIGKILL the driver once a batch is indexed; the same command again finishes the run."""
    images, local = reference
    out = tmp_path / "out"
    proc = cluster.extract(out, images, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: _indexed(out) >= 2, proc, "an indexed batch")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_before = _indexed(out)
    assert 2 <= done_before < 29, done_before
    rerun = cluster.extract(out, images, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"{done_before} from an earlier run" in stdout, stdout
    _same_as_local(out, local)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["runs"][-1]["resumed_batches"] == done_before // 2 and meta["status"]["complete"]


def test_other_settings_are_refused_as_by_the_local_engine(cluster, reference, tmp_path):
    """(c) A different --pool against an existing OUT: exit 2 naming the difference, nothing written.
    Without --ray-address: the run's own local Ray instance is shut down after it (nothing left running)."""
    images, local = reference
    out = tmp_path / "out"
    shutil.copytree(local, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = cluster.extract(out, images, "--pool", "avg", join=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, err = proc.communicate(timeout=300)
    left = Cluster("", {}, {proc.pid}).processes("")  # its session: the driver, and the Ray it started
    assert not left, left
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"featurezoo extract: error: {out} already holds features made with different settings: pool was "
        f"\"none\", this run asks \"avg\"; rerun with the same arguments to resume, or pass --overwrite to "
        f"replace them")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# -- without a cluster ------------------------------------------------------------------------------------
def test_an_unreachable_address_fails_in_seconds_writing_nothing(tmp_path, capsys):
    """(d) Nothing listens on the port: one line naming the address, exit 2, OUT not created."""
    write_good_images(tmp_path / "images", 2)
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    t0 = time.monotonic()
    code = main(["extract", MODEL, str(tmp_path / "images"), "-o", str(out), "--engine", "ray",
                 "--ray-address", address])
    seconds = time.monotonic() - t0
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == "" and seconds < 15, seconds
    assert err.strip().splitlines() == [f"featurezoo extract: error: cannot reach the Ray cluster at {address}: "
                                        f"Connection refused"]
    assert not out.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(engine="spark"), "engine 'spark' is not valid; use one of local, ray"),
    (dict(model_workers=2), r"model_workers \(--model-workers\) only apply to engine 'ray' \(--engine ray\)"),
    (dict(ray_address="auto", gpus_per_worker=1), r"ray_address \(--ray-address\), gpus_per_worker .* only apply"),
    (dict(engine="ray", workers=2), "workers and decode_threads .* are for the local engine"),
    (dict(engine="ray", ray_address="nohost"), "Ray address 'nohost' is not valid; use auto or HOST:PORT"),
    (dict(engine="ray", model_workers=0), "model workers must be a positive integer, got 0"),
    (dict(engine="ray", cpus_per_worker=-1.0), "cpus per worker must be a positive number"),
    (dict(engine="ray", device="cuda:1"), "device 'cuda:1' is not valid with engine 'ray'"),
    (dict(engine="ray", device="cuda", gpus_per_worker=0), "pass --gpus-per-worker"),
])
def test_bad_engine_arguments_start_nothing(tmp_path, kwargs, message):
    write_good_images(tmp_path / "images", 1)
    with pytest.raises(ExtractError, match=message):
        extract_features(MODEL, [tmp_path / "images"], tmp_path / "out", size=(64, 64), **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--cpus-per-worker", "0"], "argument --cpus-per-worker: must be a positive number, got '0'"),
    (["--gpus-per-worker", "-1"], "argument --gpus-per-worker: must be a number >= 0, got '-1'"),
    (["--model-workers", "x"], "argument --model-workers: must be a positive integer, got 'x'"),
    (["--engine", "dask"], "argument --engine: invalid choice: 'dask'"),
])
def test_bad_engine_flags_are_usage_errors(tmp_path, capsys, args, message):
    assert main(["extract", MODEL, str(tmp_path), "-o", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_packed_paths_round_trip():
    """The path list the decode tasks read from Ray's object store: every name back as it was."""
    paths = ["/a/img 1.jpg", "/b/été/ü.png", os.fsdecode(b"/c/\xff\xfe.jpg"), "/d/" + "x" * 300 + ".png", "/e"]
    packed = PackedPaths.pack(paths)
    assert len(packed) == 5 and list(packed) == paths and packed[-1] == "/e" and packed[1:3] == paths[1:3]
    assert list(pickle.loads(pickle.dumps(packed, protocol=5))) == paths
    assert list(PackedPaths.pack([])) == []
    with pytest.raises(IndexError):
        packed[5]


def test_model_workers_fit_the_cluster():
    assert default_model_workers({"CPU": 64.0, "GPU": 8.0}, 1, 1) == 8
    assert default_model_workers({"CPU": 64.0, "GPU": 8.0}, 4, 0.5) == 16
    assert default_model_workers({"CPU": 16.0}, 3, 0) == 4  # a CPU left per worker for decoding
    assert default_model_workers({"CPU": 2.0}, 1, 0) == 1
    _check_resources({"CPU": 2.0}, 1, 1, 0, "here")
    with pytest.raises(ExtractError, match=r"2 model worker\(s\) x 1 CPU leave no CPU for decoding; the Ray "
                                           r"cluster at here has 2 CPU\(s\)"):
        _check_resources({"CPU": 2.0}, 2, 1, 0, "here")
    with pytest.raises(ExtractError, match=r"need 2 GPU\(s\); the Ray cluster at here has 1"):
        _check_resources({"CPU": 8.0, "GPU": 1.0}, 2, 1, 1, "here")
