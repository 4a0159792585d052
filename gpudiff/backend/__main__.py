"""``python -m gpudiff.backend`` — list the registered kernels or compile them with nvcc."""

from .nvcc import main

if __name__ == "__main__":
    raise SystemExit(main())
