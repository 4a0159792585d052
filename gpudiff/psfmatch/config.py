"""PSF-matching configuration: LSST's ``PsfMatchConfig`` (+ AL and DF variants), snake_case.

Field names are the snake_case of the LSST config names and the defaults are LSST's
(docs/algorithms.md §1.1).  ``PsfMatchConfig()`` is the Alard–Lupton default; use
:meth:`PsfMatchConfig.delta_function` for the delta-function defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..configfield import option, validate_config
from ..errors import InvalidInputError

__all__ = ["PsfMatchConfig"]

_BASIS_SETS = ("alard-lupton", "delta-function")
_SPATIAL_MODELS = ("chebyshev1", "polynomial")
_REG_TYPES = ("centralDifference", "forwardDifference")
_LAMBDA_TYPES = ("absolute", "relative")
_COND_TYPES = ("EIGENVALUE", "SVD")


@dataclass(frozen=True)
class PsfMatchConfig:
    """Configuration of the PSF-matching kernel fit (docs/algorithms.md §1.1, §2, §3).

    Every field is the snake_case of an LSST ``PsfMatchConfig`` / ``PsfMatchConfigAL`` /
    ``PsfMatchConfigDF`` field with its LSST default.  Validation runs on construction.
    """

    # --- PsfMatchConfig --------------------------------------------------------------
    kernel_basis_set: str = option(
        "alard-lupton",
        doc="Kernel basis: sums of Gaussians times polynomials (Alard-Lupton) or one basis "
        "per kernel pixel (delta-function).",
        choices=_BASIS_SETS,
    )
    kernel_size: int = option(
        21,
        doc="Kernel width and height in pixels (odd for Alard-Lupton); replaced by the "
        "FWHM-scaled size when scale_by_fwhm is set.",
        min=1,
    )
    scale_by_fwhm: bool = option(
        True, doc="Scale the kernel size and the AL Gaussian widths with the PSF FWHMs."
    )
    kernel_size_fwhm_scaling: float = option(
        6.0,
        doc="Kernel size = this x the widest AL Gaussian sigma (with scale_by_fwhm).",
        min=1,
    )
    kernel_size_min: int = option(21, doc="Smallest FWHM-scaled kernel size in pixels.")
    kernel_size_max: int = option(35, doc="Largest FWHM-scaled kernel size in pixels.")
    spatial_model_type: str = option(
        "chebyshev1",
        doc="Functions of the spatial variation of kernel and background: Chebyshev (first "
        "kind) or plain polynomials.",
        choices=_SPATIAL_MODELS,
    )
    spatial_kernel_order: int = option(
        2, doc="Polynomial order of the kernel's variation across the image.", min=0
    )
    spatial_bg_order: int = option(
        1, doc="Polynomial order of the differential background's variation.", min=0
    )
    fit_for_background: bool = option(
        False, doc="Fit a differential background together with the kernel."
    )
    #: A departure from LSST (docs/algorithms.md §14): the subtraction tasks turn it on.
    spatial_order_by_cross_validation: bool = option(
        False,
        doc="Lower the spatial kernel order when a lower order predicts held-out kernel "
        "candidates better (5-fold cross-validation on their normal equations).",
        gpudiff_only=True,
    )
    size_cell_x: int = option(
        128, doc="Width in pixels of the spatial cells that spread kernel candidates.", min=32
    )
    size_cell_y: int = option(
        128, doc="Height in pixels of the spatial cells that spread kernel candidates.", min=32
    )
    n_star_per_cell: int = option(
        5,
        doc="Kernel candidates used per spatial cell in the spatial fit (-1: all).",
        min=-1,
    )
    max_spatial_iterations: int = option(
        3,
        doc="Rounds of rejecting bad candidates and refitting the spatial model.",
        min=1,
        max=5,
    )
    use_pca_for_spatial_kernel: bool = option(
        False,
        doc="Reduce the candidates' kernels to principal components before the spatial fit "
        "(the delta-function default).",
    )
    subtract_mean_for_pca: bool = option(
        True, doc="Subtract the mean kernel before the principal-component analysis."
    )
    num_principal_components: int = option(
        5, doc="Principal components kept (the mean kernel included).", min=3
    )
    single_kernel_clipping: bool = option(
        True, doc="Reject candidates whose own difference stamp has bad residual statistics."
    )
    kernel_sum_clipping: bool = option(
        True, doc="Reject candidates whose kernel sum is an outlier of the ensemble."
    )
    spatial_kernel_clipping: bool = option(
        True, doc="Reject candidates whose stamp is badly subtracted by the spatial model."
    )
    check_condition_number: bool = option(
        False,
        doc="Reject candidates whose normal matrix has a condition number above "
        "max_condition_number.",
    )
    bad_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "EDGE", "SAT"),
        doc="Mask planes whose pixels are left out of the candidates' residual statistics.",
    )
    candidate_residual_mean_max: float = option(
        0.25,
        doc="Largest |mean| of a candidate's difference/sqrt(variance) before it is rejected.",
    )
    candidate_residual_std_max: float = option(
        1.50,
        doc="Largest std of a candidate's difference/sqrt(variance) before it is rejected.",
    )
    use_core_stats: bool = option(
        False,
        doc="Compute the candidates' residual statistics in the stamp's core only "
        "(radius candidate_core_radius).",
    )
    candidate_core_radius: int = option(
        3, doc="Radius in pixels of the stamp core used with use_core_stats.", min=0
    )
    max_ksum_sigma: float = option(
        3.0,
        doc="Kernel-sum clipping threshold, in robust sigmas of the candidates' kernel sums.",
        lsst="maxKsumSigma",
    )
    max_condition_number: float = option(
        5e7, doc="Largest condition number of a candidate's normal matrix (check_condition_number)."
    )
    condition_number_type: str = option(
        "EIGENVALUE",
        doc="Condition number from the eigenvalues or the singular values of the matrix.",
        choices=_COND_TYPES,
    )
    max_spatial_condition_number: float = option(
        1e10, doc="Largest condition number of the spatial fit's normal matrix."
    )
    iterate_single_kernel: bool = option(
        False,
        doc="LSST: refit each candidate with a better variance estimate; accepted for "
        "compatibility, no effect in gpudiff.",
    )
    constant_variance_weighting: bool = option(
        True,
        doc="Weight the single-kernel fits by one constant variance instead of the "
        "per-pixel variance.",
    )
    calculate_kernel_uncertainty: bool = option(
        False,
        doc="LSST: compute kernel and background uncertainties per candidate; accepted for "
        "compatibility, no effect in gpudiff.",
    )
    use_bic_for_kernel_basis: bool = option(
        False,
        doc="LSST: choose the number of basis terms by the Bayesian information criterion; "
        "accepted for compatibility, no effect in gpudiff.",
    )
    # --- PsfMatchConfigAL ------------------------------------------------------------
    alard_n_gauss: int = option(
        3, doc="Number of Gaussians of the Alard-Lupton basis.", min=1, lsst="alardNGauss"
    )
    alard_deg_gauss: tuple[int, ...] = option(
        (4, 2, 2),
        doc="Polynomial degree that multiplies each AL Gaussian (alard_n_gauss entries).",
        min=0,
    )
    alard_sig_gauss: tuple[float, ...] = option(
        (0.7, 1.5, 3.0),
        doc="Sigmas in pixels of the AL Gaussians when they are not scaled by the FWHMs "
        "(alard_n_gauss entries).",
    )
    alard_gauss_beta: float = option(
        2.0, doc="Ratio of adjacent AL Gaussian sigmas when they are scaled by the FWHMs."
    )
    alard_min_sig: float = option(0.7, doc="Smallest FWHM-scaled AL Gaussian sigma in pixels.")
    alard_min_sig_deconv: float = option(
        0.4,
        doc="Smallest FWHM-scaled AL Gaussian sigma in pixels when the kernel must "
        "deconvolve (the convolved image's PSF is the sharper).",
    )
    # --- PsfMatchConfigDF ------------------------------------------------------------
    use_regularization: bool = option(
        True, doc="Regularize (smooth) the delta-function kernel fit."
    )
    regularization_type: str = option(
        "centralDifference",
        doc="Regularization by a central-difference stencil or by forward differences.",
        choices=_REG_TYPES,
    )
    central_regularization_stencil: int = option(
        9, doc="Points of the central-difference Laplacian stencil.", choices=(5, 9)
    )
    forward_regularization_orders: tuple[int, ...] = option(
        (1, 2),
        doc="Orders of the forward differences that are penalized (forwardDifference).",
        choices=(1, 2, 3),
    )
    regularization_border_penalty: float = option(
        3.0, doc="Extra penalty on the kernel's border pixels in the regularization.", min=0
    )
    # LSST's risk-minimizing lambda types read config keys that do not exist
    # (docs/algorithms.md §1.4 caveat); they are not offered here.
    lambda_type: str = option(
        "absolute",
        doc="How the regularization strength is set: lambda_value as is, or relative to "
        "the normal matrix's trace ratio (x lambda_scaling).",
        choices=_LAMBDA_TYPES,
    )
    lambda_value: float = option(0.2, doc="Regularization strength with lambda_type 'absolute'.")
    lambda_scaling: float = option(
        1e-4, doc="Fraction of the trace-ratio strength used with lambda_type 'relative'."
    )

    def __post_init__(self):
        validate_config(self)

        # Rules over several fields (the single-field ones are in the field options).
        def bad(msg: str):
            raise InvalidInputError(f"PsfMatchConfig: {msg}")

        if self.kernel_basis_set == "alard-lupton" and self.kernel_size % 2 == 0:
            bad(f"kernel_size must be odd for the Alard-Lupton basis, got {self.kernel_size}")
        if self.kernel_size_min > self.kernel_size_max:
            bad(f"kernel_size_min {self.kernel_size_min} > kernel_size_max {self.kernel_size_max}")
        if self.n_star_per_cell == 0:
            bad(f"n_star_per_cell must be >= 1 or -1 (all), got {self.n_star_per_cell}")
        if (
            len(self.alard_deg_gauss) != self.alard_n_gauss
            or len(self.alard_sig_gauss) != self.alard_n_gauss
        ):
            bad(
                f"alard_deg_gauss and alard_sig_gauss need "
                f"alard_n_gauss={self.alard_n_gauss} entries"
            )
        if not self.forward_regularization_orders:
            bad(
                f"forward_regularization_orders must be within 1..3, "
                f"got {self.forward_regularization_orders}"
            )

    @classmethod
    def delta_function(cls, **overrides: Any) -> "PsfMatchConfig":
        """LSST's ``PsfMatchConfigDF`` defaults (delta-function basis, PCA, regularization)."""
        base = dict(
            kernel_basis_set="delta-function",
            max_condition_number=5e6,
            use_pca_for_spatial_kernel=True,
        )
        base.update(overrides)
        return cls(**base)

    def with_overrides(self, **overrides: Any) -> "PsfMatchConfig":
        """A copy with some fields changed (unknown names raise InvalidInputError)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidInputError(f"PsfMatchConfig has no field(s) {unknown}")
        return replace(self, **overrides)

    @property
    def n_spatial_kernel_terms(self) -> int:
        o = self.spatial_kernel_order
        return (o + 1) * (o + 2) // 2

    @property
    def n_spatial_bg_terms(self) -> int:
        if not self.fit_for_background:
            return 0
        o = self.spatial_bg_order
        return (o + 1) * (o + 2) // 2
