"""``python -m benchmarks [B1 B2 ...] [--quick] [--record | --no-record] [--profile] [--keep]``

With no names, every benchmark runs, in order. A full run appends its figures to
``benchmarks/RESULTS.md`` and writes ``benchmarks/b1.png`` / ``b2.png``; a ``--quick`` run (small
sizes, for development) only prints, and draws its charts in a temporary directory, unless
``--record`` is given. ``--profile`` (needs py-spy) attaches py-spy to the processes under test,
writes their raw profiles to ``benchmarks/out/`` and adds the top functions to the figures; its
charts go to a temporary directory. The exit status is 0 even when a target is missed (the miss
is printed and recorded); it is 1 when a benchmark could not run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Options
from benchmarks.report import HERE, RESULTS, Recorder, Section

Runner = Callable[[Options], list[Section]]


def _runners() -> dict[str, tuple[str, Runner]]:
    from benchmarks import (
        b1_ceiling,
        b2_saturation,
        b3_validation,
        b4_memory,
        b5_polling,
        b6_fairness,
        b7_fast_upstream,
        b8_observability,
        b9_fleet,
        b10_soak,
    )

    return {
        "B1": ("orchestration ceiling", b1_ceiling.run),
        "B2": ("upstream saturation", b2_saturation.run),
        "B3": ("create-time validation", b3_validation.run),
        "B4": ("memory stays flat", b4_memory.run),
        "B5": ("polling under load", b5_polling.run),
        "B6": ("fairness", b6_fairness.run),
        "B7": ("fast upstream", b7_fast_upstream.run),
        "B8": ("observability cost", b8_observability.run),
        "B9": ("fleet scaling", b9_fleet.run),
        "B10": ("soak: nothing piles up", b10_soak.run),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    runners = _runners()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run ({', '.join(runners)}; default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    record = parser.add_mutually_exclusive_group()
    record.add_argument(
        "--record",
        dest="record",
        action="store_true",
        default=None,
        help="append to RESULTS.md and write the charts (default: unless --quick)",
    )
    record.add_argument("--no-record", dest="record", action="store_false", help="only print")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy to the process under test (needs py-spy)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep each stack's temporary data dir and logs"
    )
    args = parser.parse_args(argv)
    names = [n.upper() for n in args.names] or list(runners)
    unknown = [n for n in names if n not in runners]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    do_record = (not args.quick) if args.record is None else args.record
    # A profiled run's charts do not replace the plain run's (py-spy slows what it watches).
    chart_dir = (
        HERE
        if do_record and not args.profile
        else Path(tempfile.mkdtemp(prefix="batchsvc-bench-charts-"))
    )
    opts = Options(quick=args.quick, keep=args.keep, chart_dir=chart_dir, profile=args.profile)
    mode = "quick (small sizes)" if args.quick else "full"
    if args.profile:
        mode += ", py-spy attached (--profile: numbers a little lower than without)"
    recorder = Recorder(do_record, mode, argv)
    print(recorder.header())
    failed: list[str] = []
    missed: list[str] = []
    for name in names:
        title, run = runners[name]
        print(f"\n>>> {name} {title}{' (quick)' if args.quick else ''} ...", flush=True)
        started = time.monotonic()
        try:
            sections = run(opts)
        except Exception as exc:
            traceback.print_exc()
            failed.append(name)
            section = Section(name, title)
            section.check(
                "ran to the end", f"error: {type(exc).__name__}: {exc}"[:300], "yes", False
            )
            sections = [section]
        for section in sections:
            section.note(f"took {time.monotonic() - started:.0f} s of wall time")
            recorder.record(section)
            missed += [
                f"{section.key}: {r.measure} = {r.value} (target {r.target})"
                for r in section.missed
            ]
    print("\n== summary ==")
    print("\n".join(f"  MISSED {m}" for m in missed) or "  every target met")
    if failed:
        print(f"  could not run: {', '.join(failed)}")
    if do_record:
        print(f"  recorded in {RESULTS}")
    else:
        print(f"  not recorded (charts in {chart_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
