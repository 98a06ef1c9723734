"""``python -m rwp_kernels.report [--selftest]``: what this installation can do, and whether it works.

Without flags: versions of torch, CUDA and Triton, the GPUs, and each backend with the reason it is
unavailable. With ``--selftest``: every available fused backend on every device against the
reference backend (see rwp_kernels.selftest); exit status 1 if any check fails.
"""
import argparse
import platform
import sys

import torch

from . import __version__, backends
from ._version import MIN_TORCH, MIN_TRITON, tested_versions
from .selftest import MISMATCH_UNIT, SKIPPED_UNLESS_NAMED, fused_backends, local_devices, run_selftest


def _triton_version() -> str:
    try:
        import triton
    except ImportError as err:
        return f"not installed ({err})"
    return triton.__version__


def environment_rows() -> list[tuple[str, str]]:
    rows = [
        ("rwp_kernels", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch built with CUDA", torch.version.cuda or "no (CPU-only build)"),
        ("triton", _triton_version()),
        ("supported", f"torch >= {MIN_TORCH}; the Triton backend: triton >= {MIN_TRITON}"),
        ("tested with", tested_versions()),
        ("CPU threads (torch)", str(torch.get_num_threads())),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"))
    else:
        rows.append(("GPU", "none visible to torch"))
    return rows


def backend_rows() -> list[tuple[str, str]]:
    rows = []
    for name, backend in backends.REGISTRY.items():
        states = []
        for device_type in backend.device_types:
            reason = backends.unavailable_reason(name, device_type)
            states.append(f"{device_type}: " + ("available" if reason is None else f"unavailable ({reason})"))
        rows.append((f"backend {name!r}", f"{backend.description}; " + "; ".join(states)))
    for device_type in dict.fromkeys(d.type for d in local_devices()):
        rows.append((f"backend='auto' on {device_type}", backends.auto_choice(device_type)[0]))
    return rows


def extension_rows() -> list[tuple[str, str]]:
    """The C++/CUDA extension: toolchain, CUDA architectures, build folder and log, what was loaded."""
    from . import extension

    return list(extension.facts().items())


def print_table(rows, out=sys.stdout) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)


def format_results(results) -> list[str]:
    lines = []
    width = max(len(r.check) for r in results)
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        error = f"{int(r.error)} {r.unit}" if r.unit == MISMATCH_UNIT else f"{r.error:.3g} {r.unit}"
        ms = "" if r.ms != r.ms else f"{r.ms:9.2f} ms"
        lines.append(f"  {status}  {r.backend:<9} {r.device:<7} {r.check:<{width}}  {error:<22}{ms}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwp_kernels.report", description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true",
                        help="check every available fused backend on every device against the reference")
    parser.add_argument("--backend", action="append", choices=fused_backends(),
                        help="limit the self-test to this backend (repeatable)")
    parser.add_argument("--device", action="append", help="limit the self-test to this device (repeatable)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per op (median is shown)")
    args = parser.parse_args(argv)

    print("rwp_kernels installation report")
    print_table(environment_rows())
    print("backends")
    print_table(backend_rows())
    print("C++/CUDA extension")
    print_table(extension_rows())
    if not args.selftest:
        return 0

    devices = [torch.device(d) for d in args.device] if args.device else None
    print("self-test: fused backends against the reference backend (ResNet-18 for CIFAR, small CNN)")
    if not args.backend:
        for name, device_type in sorted(SKIPPED_UNLESS_NAMED):
            if backends.unavailable_reason(name, device_type) is None:
                print(f"  skipping {name!r} on {device_type} (an interpreter for testing, very slow); "
                      f"--backend {name} includes it")
    results = run_selftest(args.backend, devices, repeats=args.repeats, progress=lambda line: print(f"  {line}", flush=True))
    if not results:
        print("  no fused backend is available here, so there is nothing to compare; see the reasons above")
        return 0
    for line in format_results(results):
        print(line)
    failed = [r for r in results if not r.passed]
    print(f"self-test: {len(results) - len(failed)} of {len(results)} checks passed" + (
        "" if not failed else f"; FAILED: {len(failed)} (please report them with this output)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
