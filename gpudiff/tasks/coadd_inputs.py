"""The inputs of :class:`~gpudiff.tasks.assemble_coadd.AssembleCoaddTask`: which warps are
stacked, and with what weight (docs/algorithms.md §10.2).

Each warp gets the weight 1/MEANCLIP(variance) of its unmasked pixels
(:func:`warp_weight`), or the caller's weight (:func:`given_weights`); a warp of weight 0
is skipped, with the reason kept for the result.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..backend import Backend
from ..errors import InvalidInputError
from ..ops.stats import clipped_mean_std
from .coadd_warps import as_warp

if TYPE_CHECKING:  # only for annotations: assemble_coadd imports this module
    from .assemble_coadd import AssembleCoaddConfig

__all__ = [
    "CoaddInputs",
    "InputWeight",
    "check_calibration",
    "given_weights",
    "warp_sources",
    "warp_weight",
    "weigh_inputs",
]

log = logging.getLogger("gpudiff.tasks.assemble_coadd")


@dataclass(frozen=True)
class InputWeight:
    """The weight of one warp (:func:`warp_weight`).

    Attributes
    ----------
    weight : float
        1/MEANCLIP(variance), or 0 for a warp that cannot be used.
    reason : str
        Why the weight is 0 ("" for a usable warp).
    """

    weight: float
    reason: str


@dataclass(frozen=True)
class CoaddInputs:
    """The inputs of a coadd (:func:`weigh_inputs`, :func:`given_weights`).

    Attributes
    ----------
    sources : list
        One warp source per input (None for a missing input).
    weights : numpy.ndarray (N,)
        Per-input weight, 0 for a skipped input.
    skipped : dict of str to str
        Skipped inputs and why.
    """

    sources: list
    weights: np.ndarray
    skipped: dict


def warp_sources(warps: Sequence[Any]) -> list:
    """One warp source (:func:`~gpudiff.tasks.coadd_warps.as_warp`) per entry of
    ``warps``, named ``input i``; None entries stay None.

    Raises
    ------
    InvalidInputError
        ``warps`` is not a non-empty sequence, or an entry is not a warp.
    """
    if isinstance(warps, (str, bytes)) or not isinstance(warps, Sequence) or len(warps) == 0:
        raise InvalidInputError("AssembleCoaddTask needs a non-empty list of warps")
    return [None if w is None else as_warp(w, name=f"input {i}") for i, w in enumerate(warps)]


def warp_weight(cfg: AssembleCoaddConfig, backend: Backend, warp: Any) -> InputWeight:
    """1/MEANCLIP(variance) of the unmasked pixels of ``warp`` (docs/algorithms.md §10.2).

    Parameters
    ----------
    cfg : AssembleCoaddConfig
        ``bad_mask_planes``, ``sigma_clip``, ``clip_iter`` and ``max_weight_samples``.
    backend : Backend
        Where the clipped mean is computed.
    warp : warp source

    Returns
    -------
    InputWeight
        Weight 0 and a reason when the warp is all NaN or its mean variance is not
        positive and finite.
    """
    mi = warp.read(warp.bbox)
    xp = mi.backend.xp
    if not bool(xp.any(xp.isfinite(mi.image))):
        return _weight_of(float("nan"), False)
    var, bad = _weight_sample(cfg, mi)
    mean_var, _, _ = clipped_mean_std(var, cfg.sigma_clip, cfg.clip_iter, bad=bad, backend=backend)
    return _weight_of(mean_var, True)


def _weight_sample(cfg: AssembleCoaddConfig, mi) -> tuple[Any, Any]:
    """The (variance, excluded) sample of a warp that its weight is computed from."""
    bm = mi.mask_planes.bitmask_if_present(list(cfg.bad_mask_planes))
    var, mask = mi.variance.reshape(-1), mi.mask.reshape(-1)
    if cfg.max_weight_samples is not None and var.size > cfg.max_weight_samples:
        step = -(-var.size // cfg.max_weight_samples)  # regular stride: deterministic
        var, mask = var[::step], mask[::step]
    return var, (mask & np.int32(bm)) != 0  # the bad test on the samples only


def _weight_of(mean_var: float, any_finite: bool) -> InputWeight:
    if not any_finite:
        return InputWeight(0.0, "every pixel is NaN")
    if not (math.isfinite(mean_var) and mean_var > 0):
        return InputWeight(
            0.0,
            f"mean variance of the unmasked pixels is {mean_var:.3g} (must be finite and > 0)",
        )
    return InputWeight(1.0 / mean_var, "")


def _device_weights(cfg: AssembleCoaddConfig, be: Backend, sources: Sequence[Any]) -> list:
    """:func:`warp_weight` of every warp at once: the samples side by side as the columns of
    one stack, clipped together (``_clip_columns``: afw MEANCLIP per column, the semantics of
    :func:`~gpudiff.ops.stats.clipped_mean_std`; the sums run along the other axis, so the
    weights agree with the one-warp path to float32 rounding)."""
    from ..ops.selection import _clip_columns

    xp = be.xp
    samples, finite = [], []
    for src in sources:
        mi = src.read(src.bbox)
        var, bad = _weight_sample(cfg, mi)
        samples.append((be.asarray(var), be.asarray(bad)))
        finite.append(be.asarray(mi.backend.xp.isfinite(mi.image).any()))
    depth = max(v.size for v, _ in samples)
    if all(v.size == depth for v, _ in samples):  # warps of one box: two launches
        data = xp.stack([v.astype(xp.float32, copy=False) for v, _ in samples], axis=1)
        good = ~xp.stack([bad for _, bad in samples], axis=1)
    else:  # shorter samples padded with excluded entries
        data = xp.zeros((depth, len(samples)), dtype=xp.float32)
        good = xp.zeros((depth, len(samples)), dtype=bool)
        for j, (v, bad) in enumerate(samples):
            data[: v.size, j] = v
            good[: v.size, j] = ~bad
    mean, _, _, _ = _clip_columns(be, data, good, cfg.sigma_clip, cfg.clip_iter, want_var=False)
    host = be.asnumpy(xp.concatenate([mean.astype(xp.float64), xp.stack(finite)]))
    n = len(sources)
    return [_weight_of(float(host[j]), bool(host[n + j])) for j in range(n)]


def weigh_inputs(cfg: AssembleCoaddConfig, backend: Backend, warps: Sequence[Any]) -> CoaddInputs:
    """The warp sources of ``warps`` with their :func:`warp_weight` (0 = skipped).

    Returns
    -------
    CoaddInputs
        Missing inputs and warps of weight 0 are listed in ``skipped`` with the reason.
    """
    sources = warp_sources(warps)
    weights = np.zeros(len(sources))
    skipped: dict = {}
    present = [src for src in sources if src is not None]
    found = {}
    if backend.is_gpu and present:
        # all warps' statistics in one batched clip and one transfer, not ~150 launches
        # and two host syncs per warp
        found = dict(zip(map(id, present), _device_weights(cfg, backend, present)))
    for i, src in enumerate(sources):
        if src is None:
            skipped[f"input {i}"] = "missing"
            continue
        iw = found[id(src)] if backend.is_gpu else warp_weight(cfg, backend, src)
        weights[i] = iw.weight
        if iw.reason:
            skipped[src.name] = iw.reason
            log.warning("AssembleCoadd: skipping %s: %s", src.name, iw.reason)
    return CoaddInputs(sources, weights, skipped)


def given_weights(warps: Sequence[Any], weights: Sequence[float]) -> CoaddInputs:
    """The warp sources of ``warps`` with the caller's ``weights`` (0 skips an input).

    Raises
    ------
    InvalidInputError
        ``weights`` is not one finite value >= 0 per warp.
    """
    sources = [None if w is None else as_warp(w, name=f"input {i}") for i, w in enumerate(warps)]
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(sources),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidInputError(
            f"weights must be {len(sources)} finite values >= 0, got {weights!r}"
        )
    skipped = {
        (s.name if s is not None else f"input {i}"): "weight 0"
        for i, s in enumerate(sources)
        if s is None or w[i] == 0
    }
    return CoaddInputs(sources, w, skipped)


def check_calibration(sources: Sequence[Any]) -> None:
    """Raise InvalidInputError unless all warps share the first one's photometric
    calibration (the stack adds their pixels, so they must be in the same flux units)."""
    ref = next(s for s in sources if s is not None)
    cal = ref.photo_calib.calibration_mean
    for s in sources:
        if s is None:
            continue
        c = s.photo_calib.calibration_mean
        if not math.isclose(c, cal, rel_tol=1e-6):
            raise InvalidInputError(
                f"{s.name}: photometric calibration {c:g} differs from {ref.name}'s "
                f"{cal:g}; warps must share their flux units (LSST requires nJy)"
            )
