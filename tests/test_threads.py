"""The one thread setting (``GPUDIFF_NUM_THREADS``, ``set_num_threads``, ``num_threads``,
``threads=``, ``--threads``) and that the pools and SciPy FFTs obey it."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import scipy.fft
from astropy.io import fits

import gpudiff
from gpudiff.backend import get_backend
from gpudiff.backend import threads as th
from gpudiff.batch import task as batch_task
from gpudiff.cli import main
from gpudiff.errors import InvalidInputError
from gpudiff.ops import convolution


@pytest.fixture(autouse=True)
def _clean_setting(monkeypatch):
    """Every test starts from the environment's default and leaves no process setting."""
    monkeypatch.delenv(th.ENV_THREADS, raising=False)
    th.set_num_threads(None)
    yield
    th.set_num_threads(None)


def test_setting_precedence_env_then_set_then_with(monkeypatch):
    assert th.get_num_threads() == (os.cpu_count() or 1)
    monkeypatch.setenv(th.ENV_THREADS, "3")
    assert gpudiff.get_num_threads() == 3
    gpudiff.set_num_threads(2)
    assert th.get_num_threads() == 2
    with gpudiff.num_threads(1) as n:
        assert n == 1 and th.get_num_threads() == 1
        with th.num_threads(None):  # None leaves the setting alone
            assert th.get_num_threads() == 1
    assert th.get_num_threads() == 2
    th.set_num_threads(None)
    assert th.get_num_threads() == 3


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_bad_env_value_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv(th.ENV_THREADS, bad)
    with pytest.raises(InvalidInputError, match=th.ENV_THREADS):
        th.get_num_threads()


@pytest.mark.parametrize("bad", [0, -1, 2.5, "x", True])
def test_bad_values_are_refused(bad):
    with pytest.raises(InvalidInputError, match="positive integer"):
        th.set_num_threads(bad)
    with pytest.raises(InvalidInputError, match="positive integer"):
        with th.num_threads(bad):
            pass


def _concurrency(n_items: int, workers: int, hold_s: float = 0.03):
    """Run ``n_items`` pieces through parallel_map; the most pieces ever running at once,
    the distinct thread ids and the thread setting each piece saw."""
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}
    idents, inner = set(), []

    def piece(_):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            idents.add(threading.get_ident())
            inner.append(th.get_num_threads())
        time.sleep(hold_s)  # long enough that a free thread would pick up the next piece
        with lock:
            state["now"] -= 1

    th.parallel_map(piece, range(n_items), workers)
    return state["peak"], idents, inner


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parallel_map_uses_at_most_the_setting(n):
    # The caller asks for 8 workers: the setting caps them (the old pool took os.cpu_count()).
    with th.num_threads(n):
        peak, idents, inner = _concurrency(12, workers=8)
        assert th.cpu_workers(100) == n
        assert th.cpu_workers(100, limit=2) == min(n, 2)
    assert peak <= n
    # The pool does start n threads (one per submitted piece while none is idle: each piece
    # holds its thread 30 ms), so the bound above is not met by running sequentially.
    assert len(idents) == n
    # Each piece gets its share of the setting (n // n), so nested FFTs stay within it.
    assert set(inner) == {1}


def test_pieces_share_the_setting_between_pool_threads():
    with th.num_threads(6):
        _, _, inner = _concurrency(6, workers=3)
        assert set(inner) == {2}  # 6 threads over 3 pool threads
        _, _, inner = _concurrency(6, workers=4)
        assert set(inner) == {1}  # 6 // 4
    got = th.run_concurrently(th.get_num_threads, th.get_num_threads, parallel=False)
    assert got == [th.get_num_threads()] * 2  # sequential: the caller's whole setting


def test_concurrent_callers_keep_their_own_settings():
    """``with num_threads`` is per context: two threads (as two rows of a Dask GPU worker)
    each see their own setting, also inside the pools they start."""
    seen: dict[int, set] = {}
    go = threading.Barrier(2)

    def caller(n):
        with th.num_threads(n):
            go.wait()
            seen[n] = set(th.parallel_map(lambda _: th.get_num_threads(), range(4), 1))
            seen[n] |= {th.get_num_threads()}

    ts = [threading.Thread(target=caller, args=(n,)) for n in (1, 5)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen == {1: {1}, 5: {5}}


def _record_fft_workers(monkeypatch, names=("rfft2", "irfft2", "rfft", "fft")):
    """Wrap scipy.fft functions (the module ``Backend.fft`` is on the CPU) to record the
    ``workers`` of each call."""
    calls = []
    be = get_backend("numpy")
    assert be.fft is scipy.fft
    for name in names:
        orig = getattr(scipy.fft, name)

        def rec(*a, _orig=orig, _name=name, **kw):
            calls.append((_name, kw.get("workers")))
            return _orig(*a, **kw)

        monkeypatch.setattr(be.fft, name, rec)
    return calls


def test_fft_call_sites_receive_the_setting(monkeypatch):
    calls = _record_fft_workers(monkeypatch)
    rng = np.random.default_rng(1)
    img = rng.normal(size=(64, 48)).astype(np.float32)
    ker = rng.normal(size=(2, 7, 5)).astype(np.float32)
    with th.num_threads(3):
        out3 = convolution.correlate_many(img, ker, "numpy")
    assert calls and {w for _, w in calls} == {3}
    assert {n for n, _ in calls} == {"rfft2", "irfft2", "rfft", "fft"}
    calls.clear()
    th.set_num_threads(1)
    out1 = convolution.correlate_many(img, ker, "numpy")
    assert {w for _, w in calls} == {1}
    # pocketfft splits independent 1-D transforms between its threads: the same bits.
    np.testing.assert_array_equal(out1, out3)
    assert get_backend("numpy").fft_kwargs == {"workers": 1}


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    from gpudiff.sim import simulate_pair

    d = tmp_path_factory.mktemp("threads")
    pair = simulate_pair(
        size=256,
        n_stars=150,
        flux_min=2e3,
        flux_max=5e5,
        science=dict(sky_subtracted=True),
        template=dict(sky_subtracted=True),
        n_transients=2,
        seed=5,
    )
    sci, tmpl = d / "science.fits", d / "template.fits"
    pair.science.write(sci)
    pair.template.write(tmpl)
    return sci, tmpl, d


def test_subtraction_identical_with_one_and_two_threads(small_pair, monkeypatch):
    """``threads=`` of subtract_files reaches the FFTs, and the difference is the same bits:
    every pooled piece writes only its own outputs and the FFTs split independent rows."""
    from gpudiff.commands.subtract import subtract_files

    sci, tmpl, d = small_pair
    calls = _record_fft_workers(monkeypatch, names=("rfft2", "irfft2"))
    images, workers = {}, {}
    for n in (1, 2):
        out = d / f"diff_{n}.fits"
        calls.clear()
        s = subtract_files(sci, tmpl, out, threads=n, backend="numpy", log=lambda _: None)
        assert s["n_candidates_used"] > 0  # a real kernel fit, not a trivial pass-through
        workers[n] = {w for _, w in calls}
        with fits.open(out) as hdul:
            images[n] = {h.name: np.array(h.data) for h in hdul if h.data is not None}
    assert workers[1] == {1}
    # Whole-image FFTs get 2; pieces of a two-thread pool get one each.
    assert max(workers[2]) == 2 and workers[2] <= {1, 2}
    assert th.get_num_threads() == (os.cpu_count() or 1)  # threads= did not leak
    assert images[1].keys() == images[2].keys() and "IMAGE" in images[1]
    for name in images[1]:
        np.testing.assert_array_equal(images[1][name], images[2][name], err_msg=name)


def test_threads_keyword_in_the_signatures():
    import inspect

    from gpudiff.commands.coadd import coadd_files
    from gpudiff.commands.match_psf import match_psf_file
    from gpudiff.commands.subtract import subtract_files

    for fn in (subtract_files, match_psf_file, coadd_files):
        p = inspect.signature(fn).parameters["threads"]
        assert p.kind is p.KEYWORD_ONLY and p.default is None
        assert "threads : int, optional" in fn.__doc__


def test_cli_threads_before_and_after_the_command(monkeypatch, capsys):
    assert main(["--threads", "1", "info"]) == 0
    assert "host threads         1" in capsys.readouterr().out
    from gpudiff.commands import info

    seen = []
    monkeypatch.setattr(
        info,
        "run",
        lambda args: seen.append((th.get_num_threads(), os.environ.get(th.ENV_THREADS))) or 0,
    )
    assert main(["--threads", "2", "info"]) == 0
    assert main(["info", "--threads", "3"]) == 0
    assert main(["--threads", "2", "info", "--threads", "3"]) == 0  # the later one wins
    assert main(["info"]) == 0
    default = os.cpu_count() or 1
    # The command's processes (batch workers) get it through the environment.
    assert seen == [(2, "2"), (3, "3"), (3, "3"), (default, None)]
    assert th.ENV_THREADS not in os.environ  # restored after the command
    with pytest.raises(SystemExit):
        main(["--threads", "0", "info"])
    assert "positive integer" in capsys.readouterr().err


def test_batch_rows_default_to_one_thread(monkeypatch, tmp_path):
    from gpudiff.batch.manifest import Job

    assert batch_task.worker_threads() == 1  # not os.cpu_count(): one row per core already
    assert batch_task.worker_threads(4) == 4
    monkeypatch.setenv(th.ENV_THREADS, "3")
    assert batch_task.worker_threads() == 3  # the user asked (gpudiff --threads 3 batch)
    monkeypatch.delenv(th.ENV_THREADS)

    seen = []

    def fake_runner(job, backend, overwrite, note):
        seen.append(th.get_num_threads())
        return {"timings": {}}

    monkeypatch.setitem(batch_task._RUNNERS, "subtract", fake_runner)
    job = Job(row=1, id="1", kind="subtract", output=str(tmp_path / "d.fits"))
    assert batch_task.run_job(job)["status"] == "ok"
    assert batch_task.run_job(job, threads=2)["status"] == "ok"
    monkeypatch.setenv(th.ENV_THREADS, "x")
    bad = batch_task.run_job(job)
    assert bad["status"] == "failed" and "InvalidInputError" in bad["error"]
    assert seen == [1, 2]


def test_freed_pool_threads_are_lent_to_a_nested_pool():
    """Uneven pieces: when the short piece ends, its thread joins the nested map still
    running inside the long one; never more threads at once than the outer setting, the
    results in order, each piece still seeing its share of the setting."""
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}
    inner_threads, inner_settings = set(), []

    def busy(hold):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(hold)
        with lock:
            state["now"] -= 1

    def inner(i):
        busy(0.05)
        with lock:
            inner_threads.add(threading.get_ident())
            inner_settings.append(th.get_num_threads())
        return i * i

    def long_piece():
        n = th.cpu_workers(8)  # the pool's whole setting, not this piece's share of it
        return th.parallel_map(inner, range(8), n)

    def short_piece():
        busy(0.01)
        return "short"

    with th.num_threads(2):
        assert th.cpu_workers(8) == 2
        got = th.run_concurrently(long_piece, short_piece)
    assert got == [[i * i for i in range(8)], "short"]
    assert len(inner_threads) == 2  # the short piece's thread helped
    assert state["peak"] <= 2
    assert set(inner_settings) == {1}


def test_nested_pools_never_exceed_the_outer_setting():
    """Each outer thread owns its share of the setting (here 8 // 2 = 4), which the pools
    nested in its pieces use; freed shares are lent, and a lent thread runs its pieces
    single-threaded.  At no time do more leaves run than the outer setting (the budget
    once counted one thread per outer piece and let 14 of 8 run), and when the short
    piece ends its share helps the long piece's pool."""
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def leaf(x):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        return x

    def piece(k):
        n_leaves = 4 if k == 0 else 48
        return sum(th.parallel_map(leaf, range(n_leaves), th.cpu_workers(n_leaves)))

    with th.num_threads(8):
        t0 = time.perf_counter()
        got = th.parallel_map(piece, range(2), th.cpu_workers(2))
        wall = time.perf_counter() - t0
    assert got == [sum(range(4)), sum(range(48))]
    assert state["peak"] <= 8, state
    # 48 leaves of 20 ms on the long piece's 4 threads alone take >= 240 ms; with the short
    # piece's share lent it reaches 8 threads (>= 120 ms + start-up).
    assert state["peak"] > 4, state
    assert wall < 0.9


def test_nested_pool_errors_and_sequential_fallback():
    def inner(i):
        if i == 3:
            raise ValueError("piece 3")
        return i

    def long_piece():
        return th.parallel_map(inner, range(6), th.cpu_workers(6))

    with th.num_threads(2):
        with pytest.raises(ValueError, match="piece 3"):
            th.run_concurrently(long_piece, lambda: None)
    # Outside any pool, one thread: plain sequential map.
    with th.num_threads(1):
        assert th.parallel_map(lambda i: i + 1, range(4), 4) == [1, 2, 3, 4]


def test_blas_threads_sets_and_restores_openblas():
    libs = th._loaded_openblas()
    if not libs:
        pytest.skip("no OpenBLAS with a thread API in this process")
    before = {p: get() for p, (_, get) in libs.items()}
    env = os.environ.get("OPENBLAS_NUM_THREADS")
    with th.blas_threads(1):
        assert {get() for _, get in th._loaded_openblas().values()} == {1}
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert {p: get() for p, (_, get) in libs.items()} == before
    assert os.environ.get("OPENBLAS_NUM_THREADS") == env
    with pytest.raises(InvalidInputError):
        with th.blas_threads(0):
            pass
