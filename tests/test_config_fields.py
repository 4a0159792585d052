"""Self-documenting configs (issue 17 item 2): every field declared with its doc, allowed
values or range and LSST name; one validator; ``--show-config`` and a TOML round trip."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from gpudiff.cli import main
from gpudiff.configfield import (
    config_classes,
    config_to_toml,
    describe_config,
    field_spec,
    lsst_name,
    option,
    validate_config,
)
from gpudiff.errors import InvalidInputError
from gpudiff.psfmatch import PsfMatchConfig
from gpudiff.tasks import AlardLuptonSubtractConfig
from gpudiff.tasks.assemble_coadd import AssembleCoaddConfig
from gpudiff.tasks.compare_warp import CompareWarpAssembleCoaddConfig
from gpudiff.tasks.match_backgrounds import MatchBackgroundsConfig
from gpudiff.tasks.scale_variance import ScaleVarianceBackgroundConfig, ScaleVarianceConfig
from gpudiff.tasks.tract_background import ChooseReferenceVisitConfig, TractBackgroundConfig

#: The config classes of issue 17 item 2; discovery must find at least these.
EXPECTED = {
    "PsfMatchConfig",
    "ArtifactDetectionConfig",
    "CompareWarpAssembleCoaddConfig",
    "ImagePsfMatchConfig",
    "DetectAndMeasureConfig",
    "MatchBackgroundsConfig",
    "AssembleCoaddConfig",
    "ScaleVarianceConfig",
    "ScaleVarianceBackgroundConfig",
    "AlardLuptonPreconvolveSubtractConfig",
    "DecorrelateALKernelConfig",
    "BackgroundMatchPairConfig",
    "AlardLuptonSubtractConfig",
    "ModelPsfMatchConfig",
    "TractBackgroundConfig",
    "ChooseReferenceVisitConfig",
    "FieldConfig",
    "ObsConfig",
}


@pytest.fixture(scope="module")
def classes():
    return config_classes()


def test_discovery_finds_every_config_class(classes):
    assert EXPECTED <= {c.__name__ for c in classes}


def test_every_field_has_a_doc(classes):
    missing = [
        f"{c.__name__}.{f.name}"
        for c in classes
        for f in dataclasses.fields(c)
        if field_spec(f) is None or not field_spec(f).doc.strip()
    ]
    assert not missing, f"config fields without option(doc=...): {missing}"


def test_every_default_validates_and_is_described(classes):
    for c in classes:
        cfg = c()
        rows = describe_config(cfg)
        assert rows and all(r.doc for r in rows), c.__name__
        # A default config equals itself after one more validation (normalization is stable).
        again = dataclasses.replace(cfg)
        assert again == cfg, c.__name__


def test_lsst_names():
    assert lsst_name("spatial_kernel_order") == "spatialKernelOrder"
    spec = {f.name: field_spec(f) for f in dataclasses.fields(PsfMatchConfig)}
    assert spec["spatial_kernel_order"].lsst == "spatialKernelOrder"
    assert spec["n_star_per_cell"].lsst == "nStarPerCell"
    sub = {f.name: field_spec(f) for f in dataclasses.fields(AlardLuptonSubtractConfig)}
    assert sub["make_kernel"].lsst == "makeKernel"
    assert sub["interpolate_mask_planes"].lsst is None  # gpudiff only


def test_option_needs_a_doc():
    with pytest.raises(ValueError, match="doc"):
        option(1, doc="  ")


@pytest.mark.parametrize(
    "cls, kw, field, expected",
    [
        (PsfMatchConfig, {"kernel_size": "21"}, "PsfMatchConfig.kernel_size", "an int"),
        (PsfMatchConfig, {"kernel_size": 21.0}, "PsfMatchConfig.kernel_size", "an int"),
        (PsfMatchConfig, {"kernel_size": True}, "PsfMatchConfig.kernel_size", "an int"),
        (PsfMatchConfig, {"fit_for_background": 1}, "PsfMatchConfig.fit_for_background", "a bool"),
        (
            PsfMatchConfig,
            {"kernel_size_fwhm_scaling": "6"},
            "PsfMatchConfig.kernel_size_fwhm_scaling",
            "a float",
        ),
        (PsfMatchConfig, {"bad_mask_planes": 3}, "PsfMatchConfig.bad_mask_planes", "a tuple"),
        (
            AlardLuptonSubtractConfig,
            {"make_kernel": {"kernel_size": 23}},
            "AlardLuptonSubtractConfig.make_kernel",
            "a PsfMatchConfig",
        ),
        (
            AssembleCoaddConfig,
            {"max_band_bytes": "big"},
            "AssembleCoaddConfig.max_band_bytes",
            "an int or None",
        ),
        (
            TractBackgroundConfig,
            {"mask": ("BAD", 3)},
            "TractBackgroundConfig.mask[1]",
            "a str",
        ),
    ],
)
def test_wrong_type_names_field_and_type(cls, kw, field, expected):
    with pytest.raises(InvalidInputError) as err:
        cls(**kw)
    msg = str(err.value)
    assert field in msg and expected in msg, msg
    assert "not supported between" not in msg


def test_ints_accepted_for_floats_and_lists_for_tuples():
    cfg = PsfMatchConfig(kernel_size_fwhm_scaling=7, alard_sig_gauss=[1, 2, 3])
    assert cfg.kernel_size_fwhm_scaling == 7 and cfg.alard_sig_gauss == (1, 2, 3)
    assert isinstance(cfg.alard_sig_gauss, tuple)
    assert PsfMatchConfig(kernel_size=np.int64(23)).kernel_size == 23
    assert TractBackgroundConfig(mask="BAD").mask == ("BAD",)


#: (config class, keyword arguments, text the message must contain)
OUT_OF_RANGE = [
    (
        PsfMatchConfig,
        {"spatial_kernel_order": -1},
        "PsfMatchConfig.spatial_kernel_order must be >= 0, got -1",
    ),
    (
        PsfMatchConfig,
        {"max_spatial_iterations": 6},
        "PsfMatchConfig.max_spatial_iterations must be in [1, 5], got 6",
    ),
    (PsfMatchConfig, {"size_cell_x": 16}, "size_cell_x must be >= 32"),
    (
        AssembleCoaddConfig,
        {"sigma_clip": 0.0},
        "AssembleCoaddConfig.sigma_clip must be > 0, got 0.0",
    ),
    (AssembleCoaddConfig, {"sigma_clip": math.inf}, "sigma_clip must be finite, got inf"),
    (
        PsfMatchConfig,  # NaN fails any range
        {"kernel_size_fwhm_scaling": math.nan},
        "PsfMatchConfig.kernel_size_fwhm_scaling must be >= 1, got nan",
    ),
    (
        AssembleCoaddConfig,
        {"mask_propagation_thresholds": {"SAT": 2.0}},
        "AssembleCoaddConfig.mask_propagation_thresholds['SAT'] must be in [0, 1], got 2.0",
    ),
    (ScaleVarianceConfig, {"max_samples": 10}, "ScaleVarianceConfig.max_samples must be >= 1024"),
    (
        CompareWarpAssembleCoaddConfig,
        {"spatial_threshold": 1.5},
        "CompareWarpAssembleCoaddConfig.spatial_threshold must be in [0, 1], got 1.5",
    ),
]

BAD_CHOICE = [
    (
        PsfMatchConfig,
        {"kernel_basis_set": "gauss"},
        "PsfMatchConfig.kernel_basis_set must be one of ('alard-lupton', 'delta-function'), "
        "got 'gauss'",
    ),
    (AlardLuptonSubtractConfig, {"mode": "both"}, "AlardLuptonSubtractConfig.mode must be one of"),
    (
        PsfMatchConfig,
        {"forward_regularization_orders": (1, 4)},
        "PsfMatchConfig.forward_regularization_orders[1] must be one of (1, 2, 3), got 4",
    ),
    (
        ScaleVarianceBackgroundConfig,
        {"statistic": "MEDIAN"},
        "ScaleVarianceBackgroundConfig.statistic must be one of ('MEANCLIP',) (any case), "
        "got 'MEDIAN'",
    ),
    (
        MatchBackgroundsConfig,
        {"undersample_style": "INCREASE_NXNYSAMPLE"},
        "MatchBackgroundsConfig.undersample_style must be one of",
    ),
]


@pytest.mark.parametrize("cls, kw, text", OUT_OF_RANGE + BAD_CHOICE)
def test_out_of_range_and_bad_choice_messages(cls, kw, text):
    with pytest.raises(InvalidInputError) as err:
        cls(**kw)
    assert text in str(err.value)


def test_case_folded_choices_are_normalized():
    assert AssembleCoaddConfig(statistic="meanclip").statistic == "MEANCLIP"
    assert TractBackgroundConfig(interpolation=" linear ").interpolation == "LINEAR"
    with pytest.raises(InvalidInputError, match="kernel_basis_set"):
        PsfMatchConfig(kernel_basis_set="ALARD-LUPTON")  # case-sensitive there, as LSST


def test_cross_field_rules_kept():
    with pytest.raises(InvalidInputError, match="kernel_size must be odd"):
        PsfMatchConfig(kernel_size=20)
    assert PsfMatchConfig.delta_function(kernel_size=20).kernel_size == 20
    with pytest.raises(InvalidInputError, match="kernel_size_min 30 > kernel_size_max 25"):
        PsfMatchConfig(kernel_size_min=30, kernel_size_max=25)
    with pytest.raises(InvalidInputError, match="n_star_per_cell must be >= 1 or -1"):
        PsfMatchConfig(n_star_per_cell=0)
    with pytest.raises(InvalidInputError, match="alard_n_gauss=3 entries"):
        PsfMatchConfig(alard_deg_gauss=(4, 2))
    with pytest.raises(InvalidInputError, match="not all 0"):
        ChooseReferenceVisitConfig(0.0, 0.0, 0.0)


def test_validate_config_on_a_plain_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Tiny:
        n: int = option(1, doc="A count.", min=0)
        names: tuple[str, ...] = option(("A",), doc="Names.")
        scale: float | None = option(None, doc="A scale.", min=0, inclusive_min=False)

        def __post_init__(self):
            validate_config(self)

    assert Tiny(names=["B", "C"]).names == ("B", "C")
    with pytest.raises(InvalidInputError, match=r"Tiny.scale must be > 0, got 0"):
        Tiny(scale=0)
    with pytest.raises(InvalidInputError, match=r"Tiny.n must be an int, got '3' \(str\)"):
        Tiny(n="3")


def _show(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_subtract_show_config_lists_every_field(capsys):
    out = _show(capsys, "subtract", "--show-config")  # no input files needed
    names = [r.name for r in describe_config(AlardLuptonSubtractConfig())]
    assert any(n.startswith("make_kernel.") for n in names)
    lines = out.splitlines()
    for r in describe_config(AlardLuptonSubtractConfig()):
        line = next((x for x in lines if x.startswith(f"{r.name} = ")), None)
        assert line is not None, r.name
        assert f"[default {r.default!r}" in line
        assert r.doc in out
    # The value after --set, and the command line's mode (auto), are what is shown.
    out = _show(capsys, "subtract", "--show-config", "--set", "make_kernel.kernel_size=25")
    assert "make_kernel.kernel_size = 25  [default 21, int]" in out
    assert "mode = 'auto'" in out


def test_subtract_show_config_still_requires_inputs_without_it(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["subtract"])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_toml_round_trip_through_config(tmp_path, capsys):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    toml = _show(capsys, "subtract", "--show-config", "--format", "toml")
    data = tomllib.loads(toml)
    assert data["make_kernel"]["spatial_kernel_order"] == 1
    path = tmp_path / "cfg.toml"
    path.write_text(toml)
    again = _show(capsys, "subtract", "--config", str(path), "--show-config", "--format", "toml")
    assert again == toml

    from gpudiff.commands._config import apply_overrides, load_config_file
    from gpudiff.commands.subtract import task_config

    cfg = task_config(None, "auto")
    assert apply_overrides(AlardLuptonSubtractConfig(), load_config_file(str(path))) == cfg


def test_edited_toml_value_takes_effect(tmp_path, capsys):
    pytest.importorskip("tomllib")  # --config reads TOML with Python >= 3.11
    toml = _show(capsys, "subtract", "--show-config", "--format", "toml")
    assert "\nspatial_kernel_order = 1\n" in toml
    edited = toml.replace("\nspatial_kernel_order = 1\n", "\nspatial_kernel_order = 0\n")
    edited = edited.replace('\nmode = "auto"\n', '\nmode = "convolveScience"\n')
    path = tmp_path / "edited.toml"
    path.write_text(edited)
    out = _show(capsys, "subtract", "--config", str(path), "--show-config")
    assert "make_kernel.spatial_kernel_order = 0  [default 1, int]  *changed*" in out
    assert "mode = 'convolveScience'" in out


def test_toml_writes_none_nested_tables_and_mappings_that_read_back():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from gpudiff.commands._config import apply_overrides

    cfg = CompareWarpAssembleCoaddConfig(
        max_band_bytes=1 << 24,
        max_weight_samples=None,
        mask_propagation_thresholds={"SAT": 0.2, "CR": 0.5},
        remove_mask_planes=(),
    )
    text = config_to_toml(cfg)
    data = tomllib.loads(text)
    assert data["max_weight_samples"] == "None"
    assert data["assemble_static_sky_model"]["statistic"] == "MEANCLIP"
    assert data["detect_template"]["threshold_value"] == 300.0
    back = apply_overrides(CompareWarpAssembleCoaddConfig(), data)
    assert back == cfg
    sv = ScaleVarianceConfig(background=ScaleVarianceBackgroundConfig(ignored_pixel_mask=("BAD",)))
    assert apply_overrides(ScaleVarianceConfig(), tomllib.loads(config_to_toml(sv))) == sv


def test_every_command_with_a_config_round_trips(tmp_path, capsys):
    pytest.importorskip("tomllib")  # --config reads TOML with Python >= 3.11
    for cmd in (
        ["match-psf"],
        ["match-backgrounds"],
        ["coadd"],
        ["coadd", "--method", "median"],
    ):
        toml = _show(capsys, *cmd, "--show-config", "--format", "toml")
        path = tmp_path / "c.toml"
        path.write_text(toml)
        assert _show(capsys, *cmd, "--config", str(path), "--show-config", "--format", "toml") == (
            toml
        ), cmd
