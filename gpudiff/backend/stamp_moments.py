"""NumPy twins of the stamp kernels of ``cuda/stamp_moments.cu``.

:func:`weighted_centroid_twin` and :func:`adaptive_moments_twin` are the reference
implementations of ``weighted_centroid_f64`` and ``adaptive_moments_f64`` (one block per
source on a GPU): the CPU path, the test oracle, and, since they are written against the
array module of their inputs, also a vectorized device path on CuPy arrays.  They are
registered with their CuPy launchers in :mod:`gpudiff.backend.launchers` and reached through
:func:`gpudiff.backend.kernels.get_kernel` (``"weighted_centroid"``, ``"adaptive_moments"``);
the definitions are those of :func:`gpudiff.ops.stats.weighted_centroid` and
:func:`gpudiff.ops.stats.adaptive_moments_batch`.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError, ShapeMismatchError
from . import reference

__all__ = ["adaptive_moments_twin", "check_stamps", "weighted_centroid_twin"]


def check_stamps(stamps, *others) -> None:
    """Check the shapes of a stamp batch and of its per-stamp companions.

    Parameters
    ----------
    stamps : array
        Must have shape ``(n, s, s)``.
    *others : array or None
        Per-stamp arrays, ``(n, s, s)`` or ``(n,)``; their first axis must be ``n``.

    Raises
    ------
    ShapeMismatchError
        ``stamps`` is not a batch of square stamps, or an ``other`` has another length.
    """
    if getattr(stamps, "ndim", 0) != 3 or int(stamps.shape[1]) != int(stamps.shape[2]):
        shape = getattr(stamps, "shape", None)
        raise ShapeMismatchError(f"stamps must have shape (n, s, s), got {shape}")
    for o in others:
        if o is not None and int(o.shape[0]) != int(stamps.shape[0]):
            raise ShapeMismatchError(f"expected {stamps.shape[0]} rows, got shape {tuple(o.shape)}")


def _offsets(xp, s: int):
    """Pixel offsets from the central pixel of a side-``s`` stamp, float64 (s,)."""
    return xp.arange(s, dtype=xp.float64) - (s // 2)


def weighted_centroid_twin(stamps, x0, y0, sigma: float, niter: int = 20, max_shift: float = 2.0):
    """NumPy twin of ``weighted_centroid_f64`` (also runs on CuPy arrays): iterated
    Gaussian-weighted centroids of a stack of stamps, all stamps at once.

    See :func:`gpudiff.ops.stats.weighted_centroid` for the definition.  Exactly ``niter``
    masked steps (no host synchronisation); the round weight is separable, so each step
    is two batched matrix products with the (n, 2, s) weight rows [g, g·offset]: about 15
    whole-batch array operations per step.

    Returns
    -------
    x, y : float64 arrays (n,)
    ok : bool array (n,)
    """
    xp = reference.array_module(stamps, x0, y0)
    check_stamps(stamps, x0, y0)
    n, s = int(stamps.shape[0]), int(stamps.shape[1])
    c = _offsets(xp, s)
    c2 = xp.stack([xp.ones(s), c])  # (2, s): the weight rows' factors 1 and offset
    img = stamps.astype(xp.float64)
    # p: (n, 2) current (x, y); starting values as given
    p = xp.stack([xp.asarray(x0).astype(xp.float64), xp.asarray(y0).astype(xp.float64)], axis=1)
    ok = xp.ones(n, dtype=bool)
    step = xp.zeros(n)
    k = -0.5 / (sigma * sigma)
    with np.errstate(all="ignore"):  # failed stamps give 0/0 or inf: masked out below
        for it in range(niter):
            d = c[None, None, :] - p[:, :, None]  # (n, 2, s): offsets from the current centre
            g = xp.exp(xp.square(d) * k)  # (n, 2, s): g(x - x_c), g(y - y_c)
            w = g[:, :, None, :] * c2[None, None, :, :]  # (n, axis, [1, offset], s)
            a = img @ w[:, 0].transpose(0, 2, 1)  # (n, s_rows, 2): Σ_col I·g·[1, X]
            m = w[:, 1] @ a  # (n, 2, 2): [[Σ wI, Σ wIX], [Σ wIY, ·]]
            s0 = m[:, 0, 0]
            q = xp.stack([m[:, 0, 1], m[:, 1, 0]], axis=1) / s0[:, None]  # new (x, y)
            good = (s0 > 0) & (xp.abs(q) <= max_shift).all(axis=1)  # NaN compares False
            ok &= good
            if it == niter - 1:  # the convergence test only needs the last step
                step = xp.where(ok, xp.abs(q - p).sum(axis=1), 0.0)
            p = xp.where(ok[:, None], q, p)
    return p[:, 0], p[:, 1], ok & (step < 1e-3)


def _moment_basis(xp, s: int):
    """(s², 6) float64 [1, X, Y, X², Y², XY] over the pixels of a side-``s`` stamp (row-major),
    so that ``w.reshape(n, s²) @ basis`` gives every raw moment of a batch in one product."""
    c = _offsets(xp, s)
    X = xp.broadcast_to(c[None, :], (s, s)).reshape(-1)
    Y = xp.broadcast_to(c[:, None], (s, s)).reshape(-1)
    return xp.stack([xp.ones(s * s), X, Y, X * X, Y * Y, X * Y], axis=1)


def _raw_moments_batch(xp, im, basis, dxg, dyg, st):
    """Raw moments (m, 6) Σ w·I·[1, X, Y, X², Y², XY] of the stamps ``im`` (m, s, s) under
    the elliptical Gaussian weights of ``st`` (m, 5) [xc, yc, wxx, wyy, wxy]: whole-batch
    array operations (the device path; on NumPy see :func:`_raw_moments_columns`)."""
    m = int(im.shape[0])
    det = st[:, 2] * st[:, 3] - st[:, 4] * st[:, 4]
    h = (-0.5 / det)[:, None, None]
    # -q/2 = -(wyy·dx² - 2·wxy·dx·dy + wxx·dy²) / (2·det), with dx (m, 1, s), dy (m, s, 1)
    dx = dxg - st[:, 0][:, None, None]
    dy = dyg - st[:, 1][:, None, None]
    # the (m, 1, s) and (m, s, 1) factors first: three full-stamp operations, not six
    e = (dx * dx * (st[:, 3][:, None, None] * h) + dy * dy * (st[:, 2][:, None, None] * h)) + (
        dx * (st[:, 4][:, None, None] * (-2.0 * h))
    ) * dy
    wd = xp.exp(e) * im
    # einsum, not @: NumPy sends @ to a multithreaded BLAS, ~10x slower for these shapes
    # on two busy cores; on a GPU both are one launch
    return xp.einsum("nk,kj->nj", wd.reshape(m, -1), basis)


#: Bytes of the (s, s, columns) weight block of :func:`_raw_moments_columns` (cache-sized).
_BLOCK_BYTES = 1 << 20

#: OpenBLAS runs a GEMM on one thread when m·n·k ≤ 2¹⁸ (its SMP threshold); above it the
#: GEMM goes multithreaded, ~10x slower for these shapes on two busy cores.
_GEMM_ONE_THREAD = 1 << 18

#: Largest |exponent| of a factor of :func:`_raw_moments_columns`'s row recurrence and of
#: the weight anywhere in the stamp: within e^±600 every product stays a normal float64.
_RECURRENCE_SAFE = 600.0


def _raw_moments_columns(imT, basisT, c, st):
    """NumPy: :func:`_raw_moments_batch` of stamps stored last, ``imT`` (s, s, m).

    The weight's exponent is e = (ax + ay) + bx·dy with ax, bx functions of the column
    offset dx, ay of the row offset dy.  One float64 ``exp`` per pixel cost more than the
    rest of the step together (~7 ns without AVX-512).  Down a column e is quadratic in
    dy, which steps by 1, so row j + 1 is row j times exp(bx)·exp(ky·(2·dy + 1)) (ky the
    dy² coefficient): the weight is the exponential of the first row, then two products
    per pixel, only 3·s exponentials per stamp.  The products add ≲ 2·s roundings (a few
    1e-15 relative; the direct form's exponent carries ~1e-15).  A stamp whose weight or
    factors leave e^±600 (a weight collapsed toward the 0.04 px² floor) takes the direct
    form instead, as those factors could overflow.  With the stamps last, every per-stamp
    coefficient is a contiguous run of the innermost axis, so all these operations run at
    full vector speed on cache-sized blocks of stamps; the moments are then one GEMM
    (6, s²) @ (s², columns) per piece small enough to stay on one thread."""
    s, m = int(imT.shape[0]), int(imT.shape[2])
    det = st[:, 2] * st[:, 3] - st[:, 4] * st[:, 4]
    h = -0.5 / det
    dx = c[:, None] - st[:, 0][None, :]  # (s, m): column offsets from the centre
    dy = c[:, None] - st[:, 1][None, :]  # (s, m): row offsets
    ky = st[:, 2] * h
    ax = dx * dx * (st[:, 3] * h)
    ay = dy * dy * ky
    bx = dx * (st[:, 4] * (-2.0 * h))
    lny = ky * (2.0 * dy[:-1] + 1.0)  # (s − 1, m): ay[j + 1] − ay[j]
    # Overflowing factors (and their inf·0) belong to stamps that take the direct form.
    quiet = dict(over="ignore", under="ignore", invalid="ignore")
    with np.errstate(**quiet):
        row0 = np.exp((ax + ay[0]) + bx * dy[0])  # the first row, as the direct form
        qx = np.exp(bx)  # column factors
        qy = np.exp(lny)  # row factors
    # The weight is concave in (dx, dy): its smallest exponent is at a corner.
    corner = np.minimum(
        np.minimum((ax[0] + ay[0]) + bx[0] * dy[0], (ax[-1] + ay[0]) + bx[-1] * dy[0]),
        np.minimum((ax[0] + ay[-1]) + bx[0] * dy[-1], (ax[-1] + ay[-1]) + bx[-1] * dy[-1]),
    )
    lim = _RECURRENCE_SAFE
    safe = (corner > -lim) & (np.abs(bx).max(axis=0) < lim)
    safe &= np.abs(lny).max(axis=0, initial=0.0) < lim
    direct = np.flatnonzero(~safe)
    mom = np.empty((6, m))
    cols = max(1, _BLOCK_BYTES // (8 * s * s))
    piece = max(1, _GEMM_ONE_THREAD // (6 * s * s))
    W = np.empty((s, s, min(cols, m)))
    for a in range(0, m, cols):
        b = min(m, a + cols)
        Wb = W[:, :, : b - a]
        Wb[0] = row0[:, a:b]
        q, r = qx[:, a:b], qy[:, a:b]
        with np.errstate(**quiet):
            for j in range(1, s):  # row j = row j − 1 × its factors
                np.multiply(Wb[j - 1], q, out=Wb[j])
                np.multiply(Wb[j], r[j - 1], out=Wb[j])
        d = direct[(direct >= a) & (direct < b)]
        if d.size:
            Wb[:, :, d - a] = np.exp(
                (ax[None, :, d] + ay[:, None, d]) + bx[None, :, d] * dy[:, None, d]
            )
        np.multiply(Wb, imT[:, :, a:b], out=Wb)
        W2 = Wb.reshape(s * s, b - a)
        for u in range(0, b - a, piece):
            v = min(b - a, u + piece)
            mom[:, a + u : a + v] = basisT @ W2[:, u:v]
    return mom.T


def _adaptive_step(xp, mom, st, ok, change, act, lo, hi, tol):
    """One fixed-point step W ← 2·Q for every row from its raw moments ``mom`` (m, 6) under
    the current weight; only rows in ``act`` change.

    ``st`` is (m, 5) [xc, yc, wxx, wyy, wxy]; returns the updated (st, ok, change, act).
    The central moments are Σw(X−x̄)²/Σw = ΣwX²/Σw − x̄² (exact algebra; the cancellation
    costs < 1e-14 here)."""
    s0 = mom[:, 0]
    good = s0 > 0
    r = mom[:, 1:] / xp.where(good, s0, 1.0)[:, None]  # [x̄, ȳ, Σ wX²/Σw, Σ wY²/Σw, Σ wXY/Σw]
    cen = 2.0 * (r[:, 2:] - r[:, [0, 1, 0]] * r[:, [0, 1, 1]])
    dia = xp.clip(cen[:, :2], lo, hi)
    lim = 0.99 * xp.sqrt(dia[:, 0] * dia[:, 1])
    nxy = xp.clip(cen[:, 2], -lim, lim)
    new = xp.concatenate([r[:, :2], dia, nxy[:, None]], axis=1)
    good &= (xp.abs(r[:, :2]) <= 2.0).all(axis=1)
    ok = ok & (good | ~act)  # rows not iterated keep their flag
    upd = ok & act
    ch = xp.abs(new[:, 2:] - st[:, 2:]).sum(axis=1)
    change = xp.where(upd, ch, change)
    st = xp.where(upd[:, None], new, st)
    act = upd & (change >= tol * (st[:, 2] + st[:, 3]))
    return st, ok, change, act


#: NumPy: the stamps iterated are re-gathered once the rows still moving fall below this
#: fraction of them (a gather of every stamp costs about one step; the rows that stopped
#: are carried along masked until then, which does not change any row's result).
_REGATHER = 0.8


def adaptive_moments_twin(
    stamps,
    valid,
    w_init: float,
    max_iter: int = 60,
    tol: float = 1e-6,
    *,
    check_every: int | None = None,
):
    """NumPy twin of ``adaptive_moments_f64`` (also runs on CuPy arrays): adaptive moments
    of a stack of stamps by masked whole-batch iterations.

    See :func:`gpudiff.ops.stats.adaptive_moments_batch` for the definition.  Every step
    updates all rows still moving with whole-batch array operations (~45 of them, no host
    synchronisation); a row that converged or failed stops changing.  Every
    ``check_every`` steps the host learns which rows still move (one synchronisation),
    stops when none does and iterates only those from then on; a row's result does not
    depend on ``check_every``.  Default: 1 for NumPy arrays (free there, and compacting
    saves work: most rows converge in ~10 steps, a few noisy ones use the whole budget),
    10 for device arrays.

    Returns
    -------
    xc, yc, ixx, iyy, ixy : float64 arrays (n,)
    ok : bool array (n,)
    """
    xp = reference.array_module(stamps, valid)
    check_stamps(stamps, valid)
    n, s = int(stamps.shape[0]), int(stamps.shape[1])
    k = int(check_every) if check_every else (1 if xp is np else 10)
    if k < 1:
        raise InvalidInputError(f"check_every must be >= 1, got {check_every}")
    c = _offsets(xp, s)
    basis = _moment_basis(xp, s)
    img = xp.where(valid, stamps, 0).astype(xp.float64)
    if xp is np:  # stamps last: see _raw_moments_columns
        img = np.ascontiguousarray(img.transpose(1, 2, 0))
        basisT = np.ascontiguousarray(basis.T)

        def raw(im, st):
            return _raw_moments_columns(im, basisT, c, st)

        def take(im, rows):
            return im[:, :, rows]

    else:
        dxg, dyg = c[None, None, :], c[None, :, None]

        def raw(im, st):
            return _raw_moments_batch(xp, im, basis, dxg, dyg, st)

        def take(im, rows):
            return im[rows]

    lo, hi = 0.04, float(s * s)
    w0 = float(w_init)
    st = xp.zeros((n, 5)) + xp.asarray(np.array([0.0, 0.0, w0, w0, 0.0]))
    ok = xp.ones(n, dtype=bool)
    change = xp.full(n, xp.inf)
    act = xp.ones(n, dtype=bool)
    rows = None  # the rows iterated (None: all)
    gather = True
    done = 0
    with np.errstate(all="ignore"):  # failed rows give 0/0 or inf: masked out
        while done < max_iter:
            if rows is None:
                im, sst, sok, sch, sact = img, st, ok, change, act
            elif gather:
                im = take(img, rows)
                sst, sok, sch, sact = st[rows], ok[rows], change[rows], act[rows]
            for _ in range(min(k, max_iter - done)):
                sst, sok, sch, sact = _adaptive_step(
                    xp, raw(im, sst), sst, sok, sch, sact, lo, hi, tol
                )
                done += 1
            if rows is None:
                st, ok, change, act = sst, sok, sch, sact
            else:
                st[rows], ok[rows], change[rows], act[rows] = sst, sok, sch, sact
            if done >= max_iter:
                break
            moving = xp.nonzero(act)[0]  # the check: one host sync
            m_now = int(moving.shape[0])
            if m_now == 0:
                break
            size = n if rows is None else int(rows.shape[0])
            gather = xp is not np or m_now < _REGATHER * size
            if gather:
                rows = moving
    ok &= change < tol * (st[:, 2] + st[:, 3]) * 10
    return st[:, 0], st[:, 1], st[:, 2], st[:, 3], st[:, 4], ok
