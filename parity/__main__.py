"""Print the parity ladder as a table: `python -m parity [--device cpu|gpu] [--rung PREFIX]`.

Each row is one rung in one dtype on one device, with the max-abs and max-rel differences, the
tolerance and PASS or FAIL. Exits with status 1 when any rung fails or raises, 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback

_HEADER = (
    f"{'rung':<32} {'dtype':<9} {'device':<6} {'max-abs':>10} {'max-rel':>10} "
    f"{'atol':>8} {'rtol':>8}  result"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], action="append",
                        help="device to run on; repeatable (default: every available device)")
    parser.add_argument("--rung", action="append", default=[],
                        help="run only rungs whose name starts with this prefix; repeatable")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        print("error: the parity suite needs PyTorch; install it with pip install -e '.[torch]'",
              file=sys.stderr)
        return 2
    # Imported here, so that --help works without torch.
    from parity.harness import available_devices, pin_precision
    from parity.tolerances import tolerance

    devices = args.device or available_devices()
    missing = sorted(set(devices) - set(available_devices()))
    if missing:
        print(f"error: no {', '.join(missing)} visible to both JAX and PyTorch", file=sys.stderr)
        return 2

    pin_precision()
    # Imported after pinning, so that no computation can run at import time without it.
    from parity.rungs import RUNGS, run_rung

    names = [name for name in RUNGS if not args.rung or name.startswith(tuple(args.rung))]
    if not names:
        print(f"error: no rung starts with {', '.join(args.rung)}", file=sys.stderr)
        return 2

    print(_HEADER)
    failures = []
    start = time.perf_counter()
    for device in devices:
        for name in names:
            for dtype in RUNGS[name].dtypes:
                limits = tolerance(RUNGS[name].tolerance_key, dtype)
                prefix = f"{name:<32} {dtype:<9} {device:<6}"
                try:
                    comparison = run_rung(name, dtype, device)
                # A rung that raises is reported as ERROR, with its traceback on stderr.
                except Exception as error:
                    traceback.print_exc()
                    print(f"{prefix} {'-':>10} {'-':>10} {limits.atol:>8.1e} "
                          f"{limits.rtol:>8.1e}  ERROR {error!r}")
                    failures.append(f"{name} [{dtype}, {device}] raised {error!r}")
                    continue
                result = "PASS" if comparison.passed else "FAIL"
                print(f"{prefix} {comparison.max_abs:>10.2e} {comparison.max_rel:>10.2e} "
                      f"{limits.atol:>8.1e} {limits.rtol:>8.1e}  {result}", flush=True)
                if not comparison.passed:
                    failures.append(comparison.report())
    print(f"\n{len(failures)} failing of the rungs above, in {time.perf_counter() - start:.0f} s")
    for failure in failures:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
