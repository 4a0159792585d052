"""``gpudiff batch`` / :func:`gpudiff.batch.run` on real Dask clusters (CPU, 2 worker processes).

The data: six simulated 256² pairs (150 stars, 2e3–5e5 ADU, science FWHM 3.5 px, template
2.5 px, five transients of S/N 10–100, flux scale 1), the science file of one of them cut
in half (corrupt); plus one match-psf row.  Each subtract row sets a spatially constant
kernel and background (``set`` column), as ``gpudiff demo`` does for fields this small:
20 kernel stars do not constrain LSST's first-order spatial model well.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gpudiff.batch import output_status, read_manifest, run
from gpudiff.cli import main
from gpudiff.errors import ManifestError
from gpudiff.image import read_exposure
from gpudiff.sim import simulate_pair

distributed = pytest.importorskip("distributed")

N_PAIRS, CORRUPT = 6, 4  # manifest rows 1..6 are the pairs; row 4's science file is corrupt
SET = "make_kernel.spatial_kernel_order=0;make_kernel.spatial_bg_order=0"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Simulated pairs, a manifest (relative paths) and single-process reference outputs."""
    d = tmp_path_factory.mktemp("batch")
    (d / "data").mkdir()
    rows = []
    for i in range(1, N_PAIRS + 1):
        pair = simulate_pair(
            size=256,
            n_stars=150,
            flux_min=2e3,
            flux_max=5e5,
            seed=10 + i,
            science=dict(sky_subtracted=True),
            template=dict(sky_subtracted=True),
        )
        sci, tmpl = d / "data" / f"sci{i}.fits", d / "data" / f"tmpl{i}.fits"
        pair.science.write(sci)
        pair.template.write(tmpl)
        if i == CORRUPT:
            raw = sci.read_bytes()
            sci.write_bytes(raw[: len(raw) // 2])  # a transfer cut in the middle of the IMAGE data
        rows.append(
            dict(
                kind="subtract",
                science=f"data/sci{i}.fits",
                template=f"data/tmpl{i}.fits",
                output=f"diffs/diff{i}.fits",
                set=SET,
            )
        )
    rows.append(
        dict(
            kind="match-psf",
            exposure="data/sci1.fits",
            output="psf5/sci1.fits",
            reference_fwhm="5.0",
        )
    )
    cols = ["kind", "science", "template", "exposure", "reference_fwhm", "output", "set"]
    lines = [",".join(cols)] + [",".join(f'"{r[c]}"' if c in r else "" for c in cols) for r in rows]
    manifest = d / "manifest.csv"
    manifest.write_text("# gpudiff batch test manifest\n" + "\n".join(lines) + "\n")
    good = d / "good.csv"  # the same without the corrupt row and the match-psf row
    good.write_text(
        "\n".join(ln for k, ln in enumerate(lines[: N_PAIRS + 1]) if k != CORRUPT) + "\n"
    )
    # The single-process references: the gpudiff commands themselves, one file at a time.
    ref = d / "ref"
    ref.mkdir()
    sets = [a for s in SET.split(";") for a in ("--set", s)]
    for i in range(1, N_PAIRS + 1):
        if i != CORRUPT:
            assert (
                main(
                    [
                        "subtract",
                        str(d / "data" / f"sci{i}.fits"),
                        str(d / "data" / f"tmpl{i}.fits"),
                        "-o",
                        str(ref / f"diff{i}.fits"),
                        "--backend",
                        "numpy",
                        *sets,
                    ]
                )
                == 0
            )
    assert (
        main(
            [
                "match-psf",
                str(d / "data" / "sci1.fits"),
                "-o",
                str(ref / "psf5.fits"),
                "--reference-fwhm",
                "5",
                "--backend",
                "numpy",
            ]
        )
        == 0
    )
    return d, manifest, good, ref


@pytest.fixture(scope="module")
def cluster():
    """A 2-worker LocalCluster (processes) shared by the tests that bring their own client."""
    c = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        memory_limit="1GiB",
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(c)
    yield c, client
    client.close()
    c.close()


def _same_exposure(path, ref_path):
    a, b = read_exposure(path), read_exposure(ref_path)
    assert a.shape == b.shape and a.mask_planes == b.mask_planes
    # The same code on the same files; but Dask runs its workers with OPENBLAS_NUM_THREADS=1,
    # and a different BLAS thread count changes the summation order of float64 solves
    # (ModelPsfMatch's spatial fit): float32 pixels then differ in their last bits (measured:
    # ≤ 1.2e-4 ADU where σ ≈ 6 ADU, i.e. 2e-5 σ; the subtractions come out bit-identical).
    # Allow 1e-4 σ, far below anything measurable, and require identical masks (detections).
    sigma = float(np.nanmedian(np.sqrt(b.variance)))
    np.testing.assert_allclose(a.image, b.image, rtol=0, atol=1e-4 * sigma)
    np.testing.assert_allclose(a.variance, b.variance, rtol=1e-5)
    np.testing.assert_array_equal(a.mask, b.mask)


def _robust_z_sigma(path):
    e = read_exposure(path).masked_image
    good = e.good_pixels(("NO_DATA", "EDGE", "SAT", "BAD", "CR", "DETECTED", "DETECTED_NEGATIVE"))
    z = (e.image / np.sqrt(e.variance))[good]
    return 1.4826 * float(np.median(np.abs(z - np.median(z))))


def test_embedded_local_cluster_runs_manifest_with_a_corrupt_pair(data):
    d, manifest, _, ref = data
    out, lines = d / "out", []
    res = run(manifest, out, workers=2, backend="numpy", progress=None, log_fn=lines.append)
    t = res.table
    assert res.n_workers == 2
    assert list(t["row"]) == list(range(1, N_PAIRS + 2))
    assert list(t["status"]) == [
        "ok" if i != CORRUPT else "failed" for i in range(1, N_PAIRS + 1)
    ] + ["ok"]
    assert (res.n_ok, res.n_failed, res.n_skipped) == (N_PAIRS, 1, 0)
    # The failure names the file and says what is wrong with it; no output was left behind.
    err = t["error"][CORRUPT - 1]
    assert "FitsReadError" in err and f"sci{CORRUPT}.fits" in err and "truncated or corrupt" in err
    assert not (out / "diffs" / f"diff{CORRUPT}.fits").exists()
    assert any(f"row {CORRUPT}" in ln and "failed" in ln for ln in lines)
    for i in range(1, N_PAIRS + 1):
        if i == CORRUPT:
            continue
        path = out / "diffs" / f"diff{i}.fits"
        assert output_status(path) == (True, "")
        _same_exposure(path, ref / f"diff{i}.fits")
        ref_hdr = fits.getheader(ref / f"diff{i}.fits", 0)
        row = t[i - 1]
        # The worker and the single-process reference run the same code, but BLAS and the
        # CPU thread helper (gpudiff.backend.threads) split sums by the process's thread
        # count, so the last bits of the kernel sum may differ (seen: 2e-15 relative).
        assert row["kernel_sum"] == pytest.approx(ref_hdr["GDKSUM"], rel=1e-12)
        assert row["n_candidates_used"] == ref_hdr["GDNUSED"]
        # Flux scale 1: measured kernel sums 0.995–1.034 on these 20-star fields.
        assert abs(row["kernel_sum"] - 1) < 0.05
        # Noise-limited differences: robust σ of image/√variance is 1 within sampling
        # and decorrelation error (~60k pixels; LSST's own tests accept 10 %).
        assert abs(_robust_z_sigma(path) - 1) < 0.1
        # 5 transients of S/N 10-100 injected, 5 found in each pair; allow a missed faint one
        # or a few spurious detections (LSST-like 5σ threshold on 65k pixels).
        assert 3 <= row["n_dia_sources"] <= 12
        assert row["time_s"] > 0 and row["read_s"] > 0 and row["worker_losses"] == 0
        assert row["worker"].split(":")[1] != str(os.getpid())  # it ran in a worker process
    _same_exposure(out / "psf5" / "sci1.fits", ref / "psf5.fits")
    assert abs(t["kernel_sum"][-1] - 1) < 0.01  # match-psf keeps flux: fitted kernel sum ≈ 1
    # The summary table on disk is the returned one; throughput = ok rows per wall minute.
    back = Table.read(res.summary_path)
    assert list(back["status"]) == list(t["status"])
    assert list(back["error"].filled("")) == list(t["error"])  # ECSV reads empty cells as masked
    assert res.rows_per_minute == pytest.approx(60 * N_PAIRS / res.wall_s)
    assert "6 ok, 1 failed, 0 skipped" in lines[-1] and "rows/min" in lines[-1]
    assert not [p for p in out.rglob("*.tmp")]


def _kill_first_busy_worker(client, pids, killed, stop):
    """Kill (SIGKILL) the first worker process seen with a task assigned to it."""
    while not stop.is_set():
        for addr, keys in client.processing().items():
            if keys and addr in pids:
                os.kill(pids[addr], signal.SIGKILL)
                killed.update(addr=addr, pid=pids[addr], keys=list(keys))
                return
        time.sleep(0.005)


def test_killed_worker_loses_no_output(data, cluster):
    d, _, good, ref = data
    _, client = cluster
    out = d / "out_kill"
    pids = client.run(os.getpid)
    killed, stop = {}, threading.Event()
    th = threading.Thread(
        target=_kill_first_busy_worker, args=(client, pids, killed, stop), daemon=True
    )
    th.start()
    try:
        res = run(good, out, client=client, progress=None, log_fn=lambda s: None)
    finally:
        stop.set()
        th.join(10)
    assert killed, "no worker was ever busy"
    t = res.table
    assert res.n_ok == N_PAIRS - 1 and res.n_failed == 0
    # The scheduler counted the loss on the rows that were on the killed worker, and Dask
    # ran them again elsewhere: they finished on a process other than the killed one.
    lost = t[t["worker_losses"] > 0]
    assert len(lost) >= 1
    assert all(int(w.split(":")[1]) != killed["pid"] for w in lost["worker"])
    # Every output exactly once, valid and identical to the single-process run; no temporaries.
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted(f"diffs/diff{i}.fits" for i in range(1, N_PAIRS + 1) if i != CORRUPT)
    assert names == sorted(expected + ["batch_summary.ecsv"])
    for name in expected:
        _same_exposure(out / name, ref / os.path.basename(name))


def test_resume_does_only_missing_rows(data, cluster):
    """The state an interrupted run leaves: rows 1–2 done, row 3 truncated (written by a
    non-atomic tool), row 5 only a temporary of a killed atomic write, row 6 not started."""
    d, manifest, _, ref = data
    c, _ = cluster
    out = d / "out_resume"
    (out / "diffs").mkdir(parents=True)
    for i in (1, 2):
        shutil.copy(ref / f"diff{i}.fits", out / "diffs" / f"diff{i}.fits")
    raw = (ref / "diff3.fits").read_bytes()
    (out / "diffs" / "diff3.fits").write_bytes(raw[: len(raw) - 5000])
    (out / "diffs" / ".diff5.fits.0123456789ab.tmp").write_bytes(raw[:1000])
    assert output_status(out / "diffs" / "diff3.fits")[0] is False
    before = {i: (out / "diffs" / f"diff{i}.fits").stat().st_mtime_ns for i in (1, 2)}
    lines = []
    res = run(
        manifest,
        out,
        scheduler=c.scheduler_address,
        resume=True,
        progress=None,
        log_fn=lines.append,
    )
    status = dict(zip(res.table["row"], res.table["status"]))
    assert status == {1: "skipped", 2: "skipped", 3: "ok", 4: "failed", 5: "ok", 6: "ok", 7: "ok"}
    assert any("row 3" in ln and "invalid" in ln and "truncated" in ln for ln in lines)
    for i in (1, 2):  # untouched
        assert (out / "diffs" / f"diff{i}.fits").stat().st_mtime_ns == before[i]
    for i in (3, 5, 6):
        _same_exposure(out / "diffs" / f"diff{i}.fits", ref / f"diff{i}.fits")
    assert not list(out.rglob("*.tmp"))
    assert "temporary" in res.table["notes"][4]
    # A second resume has nothing left but the corrupt row.
    again = run(
        manifest,
        out,
        scheduler=c.scheduler_address,
        resume=True,
        progress=None,
        log_fn=lambda s: None,
    )
    assert list(again.table["status"]) == ["skipped"] * 3 + ["failed"] + ["skipped"] * 3


def test_cli_sharded_against_a_scheduler(data, cluster, capsys):
    d, manifest, _, ref = data
    c, _ = cluster
    out = d / "out_cli"
    argv = [
        "batch",
        str(manifest),
        "--out-dir",
        str(out),
        "--scheduler",
        c.scheduler_address,
        "--njobs",
        "2",
        "--job",
        "1",
        "--no-progress",
        "--backend",
        "numpy",
    ]
    capsys.readouterr()
    assert main(argv) == 1  # row 4 (corrupt) is in shard 1 of 2: rows 2, 4, 6
    text = capsys.readouterr().out
    assert "3 rows: 2 ok, 1 failed" in text and f"sci{CORRUPT}.fits" in text
    t = Table.read(out / "batch_summary_job1of2.ecsv")
    assert list(t["row"]) == [2, 4, 6]
    assert sorted(p.name for p in (out / "diffs").iterdir()) == ["diff2.fits", "diff6.fits"]
    _same_exposure(out / "diffs" / "diff6.fits", ref / "diff6.fits")
    # Usage errors are one line and exit 1 (gpudiff errors) or 2 (argparse).
    assert main(["batch", str(manifest), "--out-dir", str(out), "--njobs", "2"]) == 1
    assert "--job" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(manifest), "--out-dir", str(out), "--retries", "-1"])
    assert exc.value.code == 2


def test_coadd_rows(cluster, tmp_path):
    """A coadd row: ``warps`` is a ;-separated list; the worker runs gpudiff.commands.coadd."""
    coadd = pytest.importorskip("gpudiff.commands.coadd")
    if not hasattr(coadd, "coadd_files"):
        pytest.skip("gpudiff.commands.coadd has no coadd_files yet")
    from gpudiff.sim import make_catalog, simulate_exposure

    c, client = cluster
    cat = make_catalog(128, n_stars=30, seed=5)
    for k in range(4):  # four epochs of one field, PSF FWHM 2.5-3.4 px, independent noise
        simulate_exposure(128, catalog=cat, psf=2.5 + 0.3 * k, seed=(5, k)).exposure.write(
            tmp_path / f"w{k}.fits"
        )
    warps = ";".join(f"w{k}.fits" for k in range(4))
    manifest = _write(
        tmp_path / "coadd.csv", f"kind,warps,method,output\ncoadd,{warps},meanclip,coadd.fits\n"
    )
    res = run(manifest, tmp_path / "out", client=client, progress=None, log_fn=lambda s: None)
    assert res.n_ok == 1, res.table["error"][0]
    assert "4 of 4 warps used" in res.table["notes"][0]
    out = tmp_path / "out" / "coadd.fits"
    assert output_status(out) == (True, "")
    coadd.coadd_files(
        [str(tmp_path / f"w{k}.fits") for k in range(4)],
        str(tmp_path / "ref.fits"),
        method="meanclip",
        backend="numpy",
    )
    _same_exposure(out, tmp_path / "ref.fits")
    # Four equal-noise epochs, inverse-variance weights: the sky variance drops to 1/4
    # (the median pixel is sky; measured 0.250).
    w_var = np.median(
        [np.median(read_exposure(tmp_path / f"w{k}.fits").variance) for k in range(4)]
    )
    assert np.median(read_exposure(out).variance) / w_var == pytest.approx(0.25, rel=0.05)


def _write(path, text):
    path.write_text(text)
    return path


def test_manifest_problems_name_row_and_column(data, tmp_path):
    d, *_ = data
    sci, tmpl = d / "data" / "sci1.fits", d / "data" / "tmpl1.fits"
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(_write(tmp_path / "empty.csv", "kind,science,template,output\n"), tmp_path)
    with pytest.raises(ManifestError, match="'output'"):
        read_manifest(_write(tmp_path / "noout.csv", f"science,template\n{sci},{tmpl}\n"), tmp_path)
    with pytest.raises(ManifestError, match="row 2 and row 1 both write"):
        read_manifest(
            _write(
                tmp_path / "dup.csv",
                f"science,template,output\n{sci},{tmpl},a.fits\n{sci},{tmpl},./a.fits\n",
            ),
            tmp_path,
        )
    m = _write(
        tmp_path / "bad.csv",
        "kind,science,template,output,exposure,kernel_size\n"
        f"subtract,{sci},{tmpl},ok.fits,,\n"
        f"coadd-ish,{sci},{tmpl},k.fits,,\n"
        f"subtract,{sci},,t.fits,,\n"
        f"subtract,{sci},missing.fits,m.fits,,\n"
        f"match-psf,,,p.fits,{sci},4\n"
        f"subtract,{sci},{tmpl},x.fits,{sci},\n",
    )
    jobs = read_manifest(m, tmp_path)
    assert jobs[0].problem is None and jobs[0].inputs["template"] == str(tmpl)
    assert jobs[0].output == str(tmp_path / "ok.fits")
    expect = [
        ("row 2", "'kind'", "coadd-ish"),
        ("row 3", "'template'", "empty"),
        ("row 4", "'template'", "missing.fits does not exist"),
        ("row 5", "'kernel_size'", "odd"),
        ("row 6", "'exposure'", "does not apply to subtract"),
    ]
    for job, words in zip(jobs[1:], expect):
        assert job.problem and all(w in job.problem for w in words), job.problem
        assert "bad.csv" in job.problem
    # strict: the first bad row stops the batch before any cluster starts.
    with pytest.raises(ManifestError, match="row 2"):
        run(m, tmp_path / "o", strict=True, progress=None, log_fn=lambda s: None)
    # An ECSV manifest (empty cells are masked there) reads to the same jobs.
    t = Table({"science": [str(sci)], "template": [str(tmpl)], "output": ["ok.fits"], "set": [SET]})
    t.write(tmp_path / "m.ecsv")
    (job,) = read_manifest(tmp_path / "m.ecsv", tmp_path)
    assert job.problem is None and job.overrides == {
        "make_kernel": {"spatial_kernel_order": 0, "spatial_bg_order": 0}
    }


def test_output_status(data, tmp_path):
    d, _, _, ref = data
    good = ref / "diff1.fits"
    assert output_status(good) == (True, "")
    raw = good.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(raw[: len(raw) - 2880])
    ok, why = output_status(cut)
    assert not ok and "truncat" in why
    (tmp_path / "junk.fits").write_bytes(b"not a fits file" * 100)
    assert output_status(tmp_path / "junk.fits")[0] is False
    assert output_status(d / "data" / "nothing.fits") == (False, "missing")
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4), np.float32))]).writeto(tmp_path / "plain.fits")
    ok, why = output_status(tmp_path / "plain.fits")
    assert not ok and "IMAGE" in why


def test_one_worker_per_gpu_sets_cuda_visible_devices():
    """The fallback without dask_cuda: one Nanny per GPU id, each with its CUDA_VISIBLE_DEVICES.
    (Runs here on CPU: the workers are started but given no task that needs a GPU.)"""
    from gpudiff.batch.cluster import start_local_cluster

    cluster, is_gpu = start_local_cluster(
        gpus="0,1",
        backend="numpy",
        retries=1,
        memory_limit="512MiB",
        use_dask_cuda=False,
        tasks_per_gpu=3,
    )
    try:
        assert is_gpu
        with distributed.Client(cluster) as client:
            # a lambda (pickled by value), not os.environ.get: that would carry this process's
            # environ
            env = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
            assert sorted(env.values()) == ["0", "1"]
            # tasks_per_gpu rows at once per GPU, each thread on its own CUDA stream
            streams = client.run(
                lambda: __import__("os").environ.get("CUPY_CUDA_PER_THREAD_DEFAULT_STREAM")
            )
            assert set(streams.values()) == {"1"}
            assert sorted(client.nthreads().values()) == [3, 3]
            assert (
                client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 1
            )
    finally:
        cluster.close()


def test_import_gpudiff_does_not_import_dask():
    code = (
        "import sys, gpudiff, gpudiff.batch, gpudiff.cli; gpudiff.cli.build_parser(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'tqdm')]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_manifest_input_columns_reach_the_commands(tmp_path, monkeypatch):
    """Manifest columns named as the command-line options reach subtract_files / coadd_files
    (coadd lists ;-separated), a subtract row defaults to mode auto, a bad mask_bits cell is
    a row problem, and a row whose output fails its quality check is reported failed."""
    from gpudiff.batch import run_job
    from gpudiff.commands import coadd, subtract

    for name in ("s.fits", "t.fits", "p.fits", "n.fits", "m.fits", "w1.fits", "w2.fits"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "m.csv").write_text(
        "kind,science,template,warps,output,science_psf,template_noise,science_mask,"
        "science_mask_bits,template_fwhm,psf,fwhm,mask_bits\n"
        "subtract,s.fits,t.fits,,d.fits,p.fits,n.fits,m.fits,BAD=0;SAT=1,3.5,,,CR=3\n"
        "coadd,,,w1.fits;w2.fits,c.fits,,,,,,p.fits,4;5,\n"
        "subtract,s.fits,t.fits,,e.fits,,,,BAD,,,,\n"
    )
    jobs = read_manifest(tmp_path / "m.csv", tmp_path / "out")
    seen = {}

    def fake_subtract(science, template, output, **kw):
        seen["subtract"] = kw
        return {
            "kernel_sum": -1.0,
            "n_candidates_used": 3,
            "n_dia_sources": None,
            "mode": "auto",
            "backend": "numpy",
            "timings": {},
            "quality": ["the PSF-matching kernel sum is -1"],
        }

    def fake_coadd(warps, output, **kw):
        seen["coadd"] = kw
        return {
            "n_used": 2,
            "n_inputs": 2,
            "notes": [],
            "backend": "numpy",
            "timings": {},
            "quality": [],
        }

    monkeypatch.setattr(subtract, "subtract_files", fake_subtract)
    monkeypatch.setattr(coadd, "coadd_files", fake_coadd)
    r = run_job(jobs[0])
    kw = seen["subtract"]
    assert kw["science_psf"] == str(tmp_path / "p.fits") and kw["template_noise"] == str(
        tmp_path / "n.fits"
    )
    assert (
        kw["science_mask"] == str(tmp_path / "m.fits") and kw["science_mask_bits"] == "BAD=0;SAT=1"
    )
    assert kw["template_fwhm"] == 3.5 and kw["mode"] == "auto"
    assert kw["template_mask_bits"] == "CR=3"  # the shared mask_bits column
    assert r["status"] == "failed" and "quality check failed" in r["error"]
    assert run_job(jobs[1])["status"] == "ok"
    assert seen["coadd"]["psf"] == [str(tmp_path / "p.fits")] and seen["coadd"]["fwhm"] == [
        4.0,
        5.0,
    ]
    assert "science_mask_bits" in jobs[2].problem and "NAME=BIT" in jobs[2].problem
