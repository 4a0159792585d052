"""PSF-matching configuration: LSST's ``PsfMatchConfig`` (+ AL and DF variants), snake_case.

Field names are the snake_case of the LSST config names and the defaults are LSST's
(docs/algorithms.md §1.1).  ``PsfMatchConfig()`` is the Alard–Lupton default; use
:meth:`PsfMatchConfig.delta_function` for the delta-function defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

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
    kernel_basis_set: str = "alard-lupton"
    kernel_size: int = 21
    scale_by_fwhm: bool = True
    kernel_size_fwhm_scaling: float = 6.0
    kernel_size_min: int = 21
    kernel_size_max: int = 35
    spatial_model_type: str = "chebyshev1"
    spatial_kernel_order: int = 2
    spatial_bg_order: int = 1
    fit_for_background: bool = False
    size_cell_x: int = 128
    size_cell_y: int = 128
    n_star_per_cell: int = 5
    max_spatial_iterations: int = 3
    use_pca_for_spatial_kernel: bool = False
    subtract_mean_for_pca: bool = True
    num_principal_components: int = 5
    single_kernel_clipping: bool = True
    kernel_sum_clipping: bool = True
    spatial_kernel_clipping: bool = True
    check_condition_number: bool = False
    bad_mask_planes: tuple[str, ...] = ("NO_DATA", "EDGE", "SAT")
    candidate_residual_mean_max: float = 0.25
    candidate_residual_std_max: float = 1.50
    use_core_stats: bool = False
    candidate_core_radius: int = 3
    max_ksum_sigma: float = 3.0
    max_condition_number: float = 5e7
    condition_number_type: str = "EIGENVALUE"
    max_spatial_condition_number: float = 1e10
    iterate_single_kernel: bool = False
    constant_variance_weighting: bool = True
    calculate_kernel_uncertainty: bool = False
    use_bic_for_kernel_basis: bool = False
    # --- PsfMatchConfigAL ------------------------------------------------------------
    alard_n_gauss: int = 3
    alard_deg_gauss: tuple[int, ...] = (4, 2, 2)
    alard_sig_gauss: tuple[float, ...] = (0.7, 1.5, 3.0)
    alard_gauss_beta: float = 2.0
    alard_min_sig: float = 0.7
    alard_min_sig_deconv: float = 0.4
    # --- PsfMatchConfigDF ------------------------------------------------------------
    use_regularization: bool = True
    regularization_type: str = "centralDifference"
    central_regularization_stencil: int = 9
    forward_regularization_orders: tuple[int, ...] = (1, 2)
    regularization_border_penalty: float = 3.0
    lambda_type: str = "absolute"
    lambda_value: float = 0.2
    lambda_scaling: float = 1e-4

    def __post_init__(self):
        def bad(msg: str):
            raise InvalidInputError(f"PsfMatchConfig: {msg}")

        if self.kernel_basis_set not in _BASIS_SETS:
            bad(f"kernel_basis_set must be one of {_BASIS_SETS}, got {self.kernel_basis_set!r}")
        if self.spatial_model_type not in _SPATIAL_MODELS:
            bad(
                f"spatial_model_type must be one of {_SPATIAL_MODELS}, "
                f"got {self.spatial_model_type!r}"
            )
        if self.kernel_size < 1:
            bad(f"kernel_size must be positive, got {self.kernel_size}")
        if self.kernel_basis_set == "alard-lupton" and self.kernel_size % 2 == 0:
            bad(f"kernel_size must be odd for the Alard-Lupton basis, got {self.kernel_size}")
        if self.kernel_size_fwhm_scaling < 1:
            bad(f"kernel_size_fwhm_scaling must be >= 1, got {self.kernel_size_fwhm_scaling}")
        if self.kernel_size_min > self.kernel_size_max:
            bad(f"kernel_size_min {self.kernel_size_min} > kernel_size_max {self.kernel_size_max}")
        if self.size_cell_x < 32 or self.size_cell_y < 32:
            bad(f"size_cell_x/y must be >= 32, got {self.size_cell_x}, {self.size_cell_y}")
        if not 1 <= self.max_spatial_iterations <= 5:
            bad(f"max_spatial_iterations must be in 1..5, got {self.max_spatial_iterations}")
        if self.spatial_kernel_order < 0 or self.spatial_bg_order < 0:
            bad("spatial orders must be >= 0")
        if self.n_star_per_cell == 0 or self.n_star_per_cell < -1:
            bad(f"n_star_per_cell must be >= 1 or -1 (all), got {self.n_star_per_cell}")
        if self.num_principal_components < 3:
            bad(f"num_principal_components must be >= 3, got {self.num_principal_components}")
        if (
            len(self.alard_deg_gauss) != self.alard_n_gauss
            or len(self.alard_sig_gauss) != self.alard_n_gauss
        ):
            bad(
                f"alard_deg_gauss and alard_sig_gauss need "
                f"alard_n_gauss={self.alard_n_gauss} entries"
            )
        if self.regularization_type not in _REG_TYPES:
            bad(
                f"regularization_type must be one of {_REG_TYPES}, got {self.regularization_type!r}"
            )
        if self.central_regularization_stencil not in (5, 9):
            bad(
                f"central_regularization_stencil must be 5 or 9, "
                f"got {self.central_regularization_stencil}"
            )
        if not self.forward_regularization_orders or any(
            o not in (1, 2, 3) for o in self.forward_regularization_orders
        ):
            bad(
                f"forward_regularization_orders must be within 1..3, "
                f"got {self.forward_regularization_orders}"
            )
        if self.regularization_border_penalty < 0:
            bad(
                f"regularization_border_penalty must be >= 0, "
                f"got {self.regularization_border_penalty}"
            )
        if self.lambda_type not in _LAMBDA_TYPES:
            # LSST's risk-minimizing lambda types read config keys that do not exist
            # (docs/algorithms.md §1.4 caveat); they are not offered here.
            bad(f"lambda_type must be one of {_LAMBDA_TYPES}, got {self.lambda_type!r}")
        if self.condition_number_type not in _COND_TYPES:
            bad(f"condition_number_type must be one of {_COND_TYPES}")
        if self.candidate_core_radius < 0:
            bad("candidate_core_radius must be >= 0")

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
