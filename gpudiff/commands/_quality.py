"""The commands' own quality checks: what makes a finished run's output untrustworthy.

Each check returns a list of one-line failures (empty: passed).  The file-level functions
(``subtract_files``, ``match_psf_file``, ``coadd_files``, ``match_backgrounds_files``)
still write their outputs, so that a failed run can be inspected, and report the failures
under ``quality`` in their summary; the command line then prints them and exits with
:data:`QUALITY_EXIT` (a batch row is marked failed).
"""

from __future__ import annotations

import math
import sys

import numpy as np

__all__ = [
    "QUALITY_EXIT",
    "check_coadd",
    "check_exposure_finite",
    "check_model_psf_match",
    "check_subtraction",
    "report",
]

#: Exit status of a command whose output was written but failed its quality check
#: (1: a gpudiff error, nothing trustworthy written; 2: usage error).
QUALITY_EXIT = 3

# A PSF-to-PSF matching kernel between two unit-sum PSFs sums to 1 up to the PSF light
# outside the matching stamps (a few %); a fitted sum outside [0.5, 2] means the fit
# itself failed (issue 14 saw -88), not a property of the PSFs.
_MPM_SUM_RANGE = (0.5, 2.0)
# Relative L2 residual of PSF (x) K against the reference: 1.0 is no better than a zero
# kernel, so a larger value is a fit that went wrong.
_MPM_MAX_RESIDUAL = 1.0
# Subtraction kernel sum vs the ratio the photometric calibrations predict: calibrations
# of real data agree to a few %, so a factor 1.5 apart is a wrong kernel (or a wrong
# calibration), either way a difference not to trust.
_KSUM_MAX_FACTOR = 1.5
# Kernel sum vs the aperture-flux ratio of the kernel stars (measured by the fit): beyond
# 25 % the difference's photometry is wrong by more than any aperture-ratio error seen on
# real pairs (JWST: 0.815 vs 0.842 ± 0.038); smaller flagged disagreements are logged.
_KSUM_MAX_STAR_DISAGREEMENT = 0.25


def check_exposure_finite(exposure, what: str, bad_planes=("NO_DATA",)) -> list[str]:
    """Fails when the output has no usable pixel or non-finite pixels that are not masked."""
    mi = exposure.masked_image
    be = mi.backend
    xp = be.xp
    bm = mi.mask_planes.bitmask_if_present(list(bad_planes))
    unmasked = (mi.mask & bm) == 0
    n_un = int(unmasked.sum())
    if n_un == 0:
        return [f"every pixel of the {what} is masked ({', '.join(bad_planes)})"]
    bad = unmasked & ~(xp.isfinite(mi.image) & xp.isfinite(mi.variance))
    n_bad = int(bad.sum())
    if n_bad:
        return [
            f"{n_bad} of {n_un} unmasked pixels of the {what} are not finite (image or variance)"
        ]
    return []


def check_subtraction(metadata, result_exposure, science, template) -> list[str]:
    """Kernel sum finite and positive, (when both inputs carry a photometric calibration)
    within a factor 1.5 of the ratio it predicts, and, when the fit flagged it
    (``kernel_sum_check_failed``), within 25 % of the kernel stars' flux ratio; a finite
    difference."""
    out = []
    ks = float(metadata.get("kernel_sum", float("nan")))
    mode = str(metadata.get("mode", ""))
    if not (math.isfinite(ks) and ks > 0):
        out.append(f"the PSF-matching kernel sum is {ks:.4g} (must be finite and > 0)")
    else:
        cs, ct = science.photo_calib.calibration_mean, template.photo_calib.calibration_mean
        if cs != 1.0 and ct != 1.0:  # 1.0 is "unknown" (PhotoCalib's default)
            # flux_nJy = instFlux * calibration: the template-to-science kernel scales the
            # template's counts by c_t / c_s; the science-to-template one by the inverse.
            expected = ct / cs if mode != "convolveScience" else cs / ct
            if not (1 / _KSUM_MAX_FACTOR <= ks / expected <= _KSUM_MAX_FACTOR):
                out.append(
                    f"the kernel sum {ks:.4f} is far from the flux ratio {expected:.4f} that the "
                    "inputs' photometric calibrations predict"
                )
    r = float(metadata.get("kernel_star_flux_ratio", float("nan")))
    e = float(metadata.get("kernel_star_flux_ratio_err", float("nan")))
    if metadata.get("kernel_sum_check_failed") and math.isfinite(ks) and r > 0:
        # The fit's own check (psfmatch.fit, 2 % and 3 standard errors) is a warning there:
        # on small simulated fields of true ratio 1 it flagged 4.6 % (kernel sum 1.034 vs an
        # aperture ratio 0.988).  Only a gross disagreement fails the command.
        if abs(ks / r - 1.0) > _KSUM_MAX_STAR_DISAGREEMENT:
            out.append(
                f"the kernel sum {ks:.4f} is more than "
                f"{100 * _KSUM_MAX_STAR_DISAGREEMENT:.0f} % from the kernel stars' flux "
                f"ratio {r:.4f} ± {e:.4f}"
            )
    out += check_exposure_finite(result_exposure, "difference", ("NO_DATA", "EDGE"))
    return out


def check_model_psf_match(metadata, result_exposure) -> list[str]:
    """ModelPsfMatch: fitted kernel sum in [0.5, 2], PSF residual ≤ 1, a finite output."""
    out = []
    fks = float(metadata.get("fitted_kernel_sum", float("nan")))
    lo, hi = _MPM_SUM_RANGE
    if not (math.isfinite(fks) and lo <= fks <= hi):
        out.append(
            f"the fitted kernel sum is {fks:.4g}; matching one unit-sum PSF to another "
            f"must give about 1 (accepted {lo}-{hi})"
        )
    res = float(metadata.get("residual_max", float("nan")))
    if not (math.isfinite(res) and res <= _MPM_MAX_RESIDUAL):
        out.append(
            f"the matched PSF differs from the reference by {res:.3g} (relative L2, max over "
            f"cells; accepted <= {_MPM_MAX_RESIDUAL})"
        )
    out += check_exposure_finite(result_exposure, "PSF-matched exposure")
    return out


def check_coadd(metadata, coadd_exposure) -> list[str]:
    """At least one input used and a finite coadd wherever it has data."""
    out = []
    if int(metadata.get("n_inputs", 0)) == 0:
        out.append("no input was used in the coadd")
    return out + check_exposure_finite(coadd_exposure, "coadd")


def check_background_models(models) -> list[str]:
    """Every background model finite."""
    out = []
    for name, model in models:
        m = np.asarray(model)
        n = int((~np.isfinite(m)).sum())
        if n:
            out.append(f"the background model of {name} has {n} non-finite pixels")
    return out


def report(command: str, failures: list[str]) -> int:
    """Print the failures (stderr) and return the exit status: 0 or :data:`QUALITY_EXIT`."""
    if not failures:
        return 0
    print(
        f"gpudiff {command}: quality check failed (the output was written for inspection):",
        file=sys.stderr,
    )
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    return QUALITY_EXIT
