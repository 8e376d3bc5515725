"""Cohort runs on Ray (``--cluster``): a local two-worker cluster predicts a folder while one worker is SIGKILLed
mid-run, and plan_and_preprocess on the cluster; both must give exactly the single-process files. Ray is started
light (2 CPUs, no dashboard, a 100 MB object store) and every process it started must be gone afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from autoseg import pipeline  # noqa: E402
from autoseg.cli import main  # noqa: E402
from autoseg.cli.common import cluster_address  # noqa: E402
from autoseg.cluster import open_cluster  # noqa: E402
from autoseg.errors import AutosegError, DatasetError  # noqa: E402
from autoseg.io.images import read_image, write_image  # noqa: E402
from autoseg.layout import Roots  # noqa: E402
from autoseg.phantom import generate_case  # noqa: E402

from field_helpers import DATASET, tiny_model  # noqa: E402

RAY_PROCESS_MARKS = ("ray::", "raylet", "gcs_server", "/ray/", "ray/_private")
WORKER_TITLE = "ray::_CaseWorker"


def _processes() -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    rows = (line.strip().split(None, 1) for line in out.splitlines() if line.strip())
    return {int(r[0]): r[1] if len(r) > 1 else "" for r in rows}


def _ray_processes() -> set[int]:
    return {pid for pid, args in _processes().items() if any(m in args for m in RAY_PROCESS_MARKS)}


@pytest.fixture()
def no_stray_ray_processes():
    """Fails the test when a Ray process it started outlives it (waits up to 20 s for a slow shutdown)."""
    before = _ray_processes()
    yield
    deadline = time.monotonic() + 20
    while (left := _ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, {pid: _processes().get(pid) for pid in left}


def _inputs(folder: Path, n: int) -> Path:
    for i in range(n):
        image, _, geo = generate_case(100 + i, "small")
        write_image(folder / f"case_{i:03d}_0000.nii.gz", image, geo)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _ours(pid: int) -> bool:
    """Whether ``pid`` descends from this test process (the embedded Ray's workers do; anyone else's do not)."""
    while pid > 1:
        pid = _parent(pid)
        if pid == os.getpid():
            return True
    return False


def _kill_a_worker_after_first_output(out: Path, killed: list[str], stop: threading.Event) -> None:
    """SIGKILL one predictor actor process of this test's Ray once the first case is written (as the OOM killer
    would): a busy one when there is one (its case must be redone), else an idle one (it must be restarted)."""
    while not stop.is_set():
        if any(p.name.endswith(".nii.gz") and not p.name.startswith(".tmp-") for p in out.glob("*")):
            workers = sorted(((not a.startswith(WORKER_TITLE + ".run"), pid, a) for pid, a in _processes().items()
                              if a.startswith(WORKER_TITLE) and _ours(pid)))
            if workers:
                _, pid, title = workers[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(title)
                return
        time.sleep(0.05)


def test_cluster_predict_survives_a_killed_worker_and_equals_single_process(tmp_path, no_stray_ray_processes,
                                                                             capsys):
    roots = Roots(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    tiny_model(roots.results)
    src = _inputs(tmp_path / "in", 4)
    settings = dict(dataset=DATASET, device="cpu", precision="fp32", mirror=False)  # auto is measured per worker
    pipeline.predict(roots, src, tmp_path / "single", **settings)

    out, killed, stop = tmp_path / "cluster", [], threading.Event()
    watcher = threading.Thread(target=_kill_a_worker_after_first_output, args=(out, killed, stop), daemon=True)
    with open_cluster("local", num_cpus=2) as cluster:
        assert cluster.resources()[:2] == (2, 0)
        watcher.start()
        try:  # the runtime opened above is reused, as for a user who called ray.init first
            pipeline.predict(roots, src, out, cluster="local", cluster_workers=2, **settings)
        finally:
            stop.set()
            watcher.join()
        assert killed, "no worker process was found to kill: the run ended first"
        single, cluster_files = _files(tmp_path / "single"), _files(out)
        # no temporaries; each case's record of the model that made it (the same model, so the same bytes)
        assert sorted(cluster_files) == sorted(single) == sorted(
            [f"case_{i:03d}.nii.gz" for i in range(4)] + [f"case_{i:03d}.model.json" for i in range(4)])
        for name in (n for n in single if n.endswith(".nii.gz")):
            a, geo_a = read_image(tmp_path / "single" / name)
            b, geo_b = read_image(out / name)
            assert geo_a == geo_b and np.array_equal(a, b), name
            assert len(np.unique(a)) > 1, name  # the tiny network labels something: the comparison means something
        assert cluster_files == single  # byte for byte

        # a rerun predicts only what is missing, leaves the finished outputs as they are and reports a bad case by
        # name without stopping the others
        first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        (out / "case_001.nii.gz").unlink()
        (src / "case_bad_0000.nii.gz").write_bytes(b"not an image")
        capsys.readouterr()
        with pytest.raises(DatasetError, match="case case_bad: ") as e:
            pipeline.predict(roots, src, out, cluster="local", **settings)
        assert len(e.value.problems) == 1
        assert "predicting 2 case(s)" in capsys.readouterr().out
        again = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        assert sorted(again) == sorted(first) and _files(out) == single
        assert all(again[n] == first[n] for n in first if not n.startswith("case_001."))  # its record is rewritten


def test_cluster_plan_and_preprocess_equals_plain_run(small_dataset, roots, tmp_path, no_stray_ray_processes):
    plain = Roots(roots["AUTOSEG_RAW"], tmp_path / "plain", tmp_path / "results")
    on_ray = Roots(roots["AUTOSEG_RAW"], tmp_path / "ray", tmp_path / "results")
    pipeline.plan_and_preprocess(plain, small_dataset.name, ["3d_fullres"], 1, verify=True, device="cpu")
    pipeline.plan_and_preprocess(on_ray, small_dataset.name, ["3d_fullres"], 2, verify=True, device="cpu",
                                 cluster="local")
    a, b = plain.preprocessed / small_dataset.name, on_ray.preprocessed / small_dataset.name
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".npy" and not f.stem.endswith("_seg")]) == 6
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_cluster_flag_and_auto_resolution(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None and cluster_address("local") == "local"
    assert cluster_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster_address("auto") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "not an address")
    with pytest.raises(AutosegError, match="RAY_ADDRESS"):
        cluster_address("auto")
    with pytest.raises(SystemExit):
        main(["predict", "-i", "x", "-o", "y", "-d", "1", "--cluster", "nowhere"])
    assert "not auto, local or a Ray address" in capsys.readouterr().err


def test_auto_without_a_running_cluster_runs_without_ray(tmp_path, monkeypatch, no_stray_ray_processes, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray head was started on this machine, so --cluster auto would join it")
    with open_cluster("auto") as cluster:
        assert cluster is None
    assert "running in this process" in capsys.readouterr().out
    assert not ray.is_initialized()


def test_unreachable_address_is_a_clear_error(no_stray_ray_processes):
    with pytest.raises(AutosegError, match="cannot join a Ray cluster"):
        with open_cluster("127.0.0.1:1"):
            pass
