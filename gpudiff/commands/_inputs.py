"""Shared plumbing of the input-file options (:mod:`gpudiff.image.inputs`) of the commands.

Commands with two images (``subtract``) take ``--science-X`` / ``--template-X``; commands with
one image take ``--X``; commands with many (``coadd``, ``match-backgrounds``) take ``--X FILE
[FILE ...]``: **one value for every input, or exactly one per input in the inputs' order**
(the rule of ``--psf-matched``).  X is ``psf``, ``noise`` (σ), ``variance``, ``ivar``,
``mask`` (+ ``mask-bits``), and ``fwhm`` (the last-resort PSF FWHM).
"""

from __future__ import annotations

import argparse

from ..errors import InvalidInputError

__all__ = ["INPUT_OPTIONS", "add_input_options", "input_kwargs", "per_input"]

#: The per-image input options (keyword names of the file-level functions).
INPUT_OPTIONS = ("psf", "noise", "variance", "ivar", "mask", "mask_bits", "fwhm")


def add_input_options(
    parser: argparse.ArgumentParser,
    roles=("science", "template"),
    nargs: str | None = None,
    psf: bool = True,
) -> None:
    """The options for what users hand beside their images (gpudiff.image.inputs).

    ``roles`` ``("science", "template")`` gives ``--science-psf`` ... ``--template-mask``
    plus ``--mask-bits`` (both masks) and ``--fwhm``/``--science-fwhm``/``--template-fwhm``;
    ``roles=()`` gives the
    single-image ``--psf``, ``--noise``, ``--variance``, ``--ivar``, ``--mask``,
    ``--mask-bits`` and ``--fwhm`` (with ``nargs="+"``: one value for all inputs or one
    per input, in order).
    """
    g = parser.add_argument_group("inputs beside the image (a PSF, noise map, mask, FWHM)")
    prefixes = [f"{r}-" for r in roles] or [""]
    for pre in prefixes:
        who = pre[:-1] or "the input"
        many = " (one for all inputs, or one per input in order)" if nargs else ""
        if psf:
            g.add_argument(
                f"--{pre}psf",
                metavar="FILE",
                nargs=nargs,
                help=f"PSF of {who}: a PSF image FITS (normalised; odd, centred), a cube with a "
                f"table of x, y positions, or gpudiff's PSF file; wins over the file's PSF{many}",
            )
        g.add_argument(
            f"--{pre}noise",
            metavar="FILE",
            nargs=nargs,
            help=f"1-sigma noise map of {who} (e.g. JWST ERR); variance = sigma^2{many}",
        )
        g.add_argument(
            f"--{pre}variance", metavar="FILE", nargs=nargs, help=f"variance map of {who}{many}"
        )
        g.add_argument(
            f"--{pre}ivar",
            metavar="FILE",
            nargs=nargs,
            help=f"inverse-variance (weight) map of {who}; a noise/variance file whose header "
            f"says inverse variance (EXTNAME WHT/IVAR, UTYPE, BUNIT) is read as one too{many}",
        )
        g.add_argument(
            f"--{pre}mask",
            metavar="FILE",
            nargs=nargs,
            help=f"mask of {who}, OR-ed into its own; bits named by --{pre}mask-bits, else the "
            f"file's MP_* cards, else nonzero = BAD{many}",
        )
        g.add_argument(
            f"--{pre}mask-bits",
            metavar="NAME=BIT,...",
            help=f"plane names of the --{pre}mask file's bits, e.g. 'BAD=0,SAT=1'",
        )
    if roles:
        g.add_argument(
            "--mask-bits",
            metavar="NAME=BIT,...",
            help="plane names of every mask file's bits unless --science-mask-bits / "
            "--template-mask-bits say otherwise",
        )
    if psf:
        g.add_argument(
            "--fwhm",
            metavar="F",
            type=float,
            nargs=nargs,
            help="last-resort PSF FWHM in pixels (a Gaussian), used only when there is no PSF in "
            "the file or given, none can be estimated from the stars and no FWHM card"
            + (" (one for all inputs, or one per input)" if nargs else ""),
        )
        for r in roles:
            g.add_argument(
                f"--{r}-fwhm", metavar="F", type=float, help=f"as --fwhm, for the {r} only"
            )


def input_kwargs(args: argparse.Namespace, roles=("science", "template")) -> dict:
    """The input-file options of ``args`` as keyword arguments of the file-level functions."""
    out = {}
    for r in roles:
        for opt in ("psf", "noise", "variance", "ivar", "mask", "mask_bits", "fwhm"):
            out[f"{r}_{opt}"] = getattr(args, f"{r}_{opt}", None)
    out["fwhm"] = getattr(args, "fwhm", None)
    shared_bits = getattr(args, "mask_bits", None) if roles else None
    for r in roles:  # --mask-bits names the bits of both masks unless one has its own
        if out[f"{r}_mask_bits"] is None:
            out[f"{r}_mask_bits"] = shared_bits
    return out


def per_input(value, n: int, what: str) -> list:
    """``value`` for each of ``n`` inputs: None → all None; a scalar, a path or a one-item
    list → the same for all; a list of ``n`` → one each; anything else → InvalidInputError."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return [value[0]] * n
        if len(value) != n:
            raise InvalidInputError(
                f"{len(value)} values for {what} but {n} inputs; give one for all "
                "inputs or one per input, in the inputs' order"
            )
        return list(value)
    return [value] * n
