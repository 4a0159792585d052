"""Forwarding a command's parsed arguments to its file-level function.

``gpudiff coadd`` and ``gpudiff match-psf`` take the same single-role input options
(:func:`gpudiff.commands._inputs.add_input_options` with no roles) plus ``--backend`` and
``--overwrite``; their ``run`` functions hand these on unchanged, so the list lives here
once rather than in each command.
"""

from __future__ import annotations

import argparse

__all__ = ["file_options"]

#: The single-role input options, by their argparse destination names.
_INPUT_OPTIONS = ("psf", "noise", "variance", "ivar", "mask", "mask_bits", "fwhm")


def file_options(args: argparse.Namespace) -> dict:
    """The keyword arguments ``backend``, ``overwrite`` and the input options (``psf``,
    ``noise``, ``variance``, ``ivar``, ``mask``, ``mask_bits``, ``fwhm``) of ``args``.

    Parameters
    ----------
    args : argparse.Namespace
        A command's parsed arguments; ``backend`` may be absent (it is a global option).

    Returns
    -------
    dict
        Keyword arguments of ``coadd_files`` / ``match_psf_file``.
    """
    out = {"backend": getattr(args, "backend", None), "overwrite": args.overwrite}
    out.update({name: getattr(args, name) for name in _INPUT_OPTIONS})
    return out
