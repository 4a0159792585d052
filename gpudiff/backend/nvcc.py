"""Compile every ``cuda/*.cu`` with ``nvcc`` (no GPU needed) and list the registered kernels.

CI runs ``python -m gpudiff.backend --check --arch sm_90``: every source must compile
standalone with warnings as errors, and every ``extern "C"`` symbol the registry names must
be in the cubin.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError, KernelRegistryError
from .kernels import _REGISTRY, _symbols_of, cuda_source_dir, cuda_sources, get_spec, list_kernels

__all__ = ["NVCC_OPTIONS", "NvccResult", "compile_all_with_nvcc", "main"]

#: Options for the standalone ``nvcc`` check (besides ``-arch`` and the output).
NVCC_OPTIONS: tuple[str, ...] = ("-std=c++17", "--fmad=false", "-Werror", "all-warnings")


# ----------------------------------------------------------------------------------------


@dataclass
class NvccResult:
    """Outcome of compiling one ``.cu`` file with nvcc."""

    path: Path
    ok: bool
    command: list[str]
    output: str = ""
    missing_symbols: list[str] = field(default_factory=list)


def compile_all_with_nvcc(
    arch: str = "sm_90",
    *,
    nvcc: str | None = None,
    werror: bool = True,
    out_dir: str | os.PathLike | None = None,
    sources: list[Path] | None = None,
    timeout: float = 300.0,
) -> list[NvccResult]:
    """Compile every ``cuda/*.cu`` standalone with ``nvcc -arch=ARCH -cubin``.

    Warnings are errors when ``werror`` (``-Werror all-warnings``).  A file also fails when a
    registered ``extern "C"`` symbol of it is missing from the cubin.  Nothing is loaded on
    a device, so this runs on a machine without a GPU.

    Returns
    -------
    list of NvccResult
        One per file, in name order; ``ok`` tells success.

    Raises
    ------
    KernelRegistryError
        ``nvcc`` is not found.
    """
    exe = nvcc or shutil.which("nvcc")
    if not exe:
        raise KernelRegistryError("nvcc not found on PATH (install the CUDA toolkit)")
    files = sorted(sources) if sources is not None else cuda_sources()
    opts = (
        list(NVCC_OPTIONS)
        if werror
        else [o for o in NVCC_OPTIONS if o not in ("-Werror", "all-warnings")]
    )
    results: list[NvccResult] = []
    with tempfile.TemporaryDirectory(prefix="gpudiff-nvcc-") as tmp:
        outdir = Path(out_dir) if out_dir is not None else Path(tmp)
        outdir.mkdir(parents=True, exist_ok=True)
        for src in files:
            cubin = outdir / (src.stem + f".{arch}.cubin")
            cmd = [exe, f"-arch={arch}", "-cubin", *opts, "-o", str(cubin), str(src)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                ok = proc.returncode == 0
                out = (proc.stdout + proc.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                ok, out = False, f"{type(exc).__name__}: {exc}"
            missing: list[str] = []
            if ok:
                blob = cubin.read_bytes()
                missing = [s for s in _symbols_of(src.name) if s.encode() not in blob]
                if missing:
                    ok = False
                    out = (out + "\n" if out else "") + f"missing kernels: {missing}"
            results.append(NvccResult(src, ok, cmd, out, missing))
    return results


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m gpudiff.backend --check | --list``."""
    ap = argparse.ArgumentParser(
        prog="python -m gpudiff.backend",
        description=(
            "gpudiff CUDA kernel registry: list kernels, or compile every cuda/*.cu with nvcc."
        ),
    )
    ap.add_argument(
        "--check", action="store_true", help="compile every .cu with nvcc -cubin (no GPU needed)"
    )
    ap.add_argument("--list", action="store_true", help="list the registered kernels")
    ap.add_argument("--arch", default="sm_90", help="nvcc -arch value for --check (default sm_90)")
    ap.add_argument("--nvcc", default=None, help="path of nvcc (default: from PATH)")
    ap.add_argument("--no-werror", action="store_true", help="do not treat nvcc warnings as errors")
    args = ap.parse_args(argv)
    if not (args.check or args.list):
        ap.print_help()
        return 2
    rc = 0
    try:
        if args.list:
            src_dir = cuda_source_dir()
            print(f"CUDA sources: {src_dir}")
            for name in list_kernels():
                s = get_spec(name)
                where = f"{s.source}: {', '.join(s.symbols)}" if s.source else "NumPy only"
                print(f"  {name:<16} {where}\n  {'':<16} {s.doc}")
        if args.check:
            results = compile_all_with_nvcc(args.arch, nvcc=args.nvcc, werror=not args.no_werror)
            for r in results:
                print(f"{'ok  ' if r.ok else 'FAIL'} {r.path.name}")
                if r.output:
                    print("     " + r.output.replace("\n", "\n     "))
                if not r.ok:
                    rc = 1
            referenced = {s.source for s in _REGISTRY.values() if s.source}
            for r in results:
                if r.path.name not in referenced:
                    print(f"note {r.path.name}: no registered kernel uses it")
            missing = sorted(referenced - {r.path.name for r in results})
            for m in missing:
                print(f"FAIL {m}: registered but not found in {cuda_source_dir()}")
                rc = 1
            print(
                f"{sum(r.ok for r in results)}/{len(results)} CUDA sources compiled for {args.arch}"
            )
    except (KernelRegistryError, InvalidInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
