"""Prebuild the C++/CUDA extension: ``python -m rwp_kernels.build [--force]``.

Compiles it into the torch extensions cache exactly as the first use would (for images and CI), loads
it, and says what was built. Exit status 0 when the extension loads, 1 when it cannot be built.
"""
import argparse
import logging
import sys

from . import _ext_config as C
from . import extension


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwp_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="compile again even if a cached build exists")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)  # the loader's child
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--emulated", action="store_true",
                        help='build the library of backend "cuda-emu" (the CUDA kernels emulated on the CPU)')
    args = parser.parse_args(argv)

    if args.compile_only:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        cfg = C.make_config(args.emulated)
        if cfg.name != args.name:
            print(f"the configuration changed between processes ({cfg.name} != {args.name})", file=sys.stderr)
            return 2
        extension.compile_here(cfg)
        return 0

    try:
        ext = extension.load(rebuild=args.force, emulated=args.emulated)
    except extension.ExtensionUnavailable as err:
        print(f"rwp_kernels: the extension is unavailable: {err}", file=sys.stderr)
        return 1
    kernels = "CPU and CUDA kernels" if ext.with_cuda else f"CPU kernels only; {ext.why_no_cuda}"
    if args.emulated:
        kernels = 'the CUDA kernels emulated on the CPU (backend "cuda-emu")'
    took = f" in {ext.build_seconds:.0f} s" if ext.build_seconds is not None else ""
    print(f"rwp_kernels: extension ready ({ext.origin}{took}): {ext.library}\n  {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
