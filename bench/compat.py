"""``python -m bench.compat [--quick]``: one loopback filesystem three ways (issue 13).

``mfusepy`` runs bench/peers/mfusepy_loopback.py on mfusepy (libfuse 3); ``fusepass-compat`` runs
the same file, unchanged, through ``python -m fusepass.compat``; ``fusepass-paths`` is
``fusepass.examples.path_loopback`` (the path layer, passthrough on). ``native`` is the source
itself. Sequential read, 4 KiB random reads, stat of each file (after creating them) and untar,
with the inputs, steps and rules of ``python -m bench``; prints a Markdown table. Needs mfusepy
in this interpreter (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from dataclasses import replace

from . import environment as envmod
from . import report, workloads
from .targets import Native, Peer, Target

STEP_IDS = ("seqread", "randread1", "meta-create", "meta-stat", "untar")


def this_python(name: str, label: str, argv: list[str]) -> Peer:
    """A filesystem program run by this interpreter (which has mfusepy and fusepass)."""
    return Peer(name, label, [sys.executable, *argv], None)


def targets() -> list[Target]:
    loopback = str(envmod.MFUSEPY_LOOPBACK)
    return [
        Native(),
        this_python("mfusepy", "mfusepy loopback", [loopback]),
        this_python("fusepass-compat", "the same file, python -m fusepass.compat", ["-m", "fusepass.compat", loopback]),
        this_python("fusepass-paths", "path_loopback, passthrough on",
                   ["-m", "fusepass.examples.path_loopback", "--passthrough", "on"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compat", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", default="/var/tmp/fusepass-bench-compat",
                        help="inputs, mount points and server logs; removed afterwards unless --keep-data")
    parser.add_argument("--keep-data", action="store_true", help="keep the work directory (and reuse it next time)")
    args = parser.parse_args(argv)
    params = replace(workloads.QUICK if args.quick else workloads.FULL, rounds=args.rounds)
    steps = [s for s in workloads.STEPS if s.id in STEP_IDS]
    work = os.path.abspath(args.workdir)
    workloads.prepare(work, params, print)
    results: dict[tuple[str, str], list[float]] = {}
    configs = targets()
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    for r in range(params.rounds):
        for t in configs[r % len(configs):] + configs[:r % len(configs)]:
            tag = f"{t.name}-r{r + 1}"
            mnt = os.path.join(work, "mnt", t.name)
            os.makedirs(mnt, exist_ok=True)
            workloads.prepare_round(work, tag, steps)
            try:
                with t.mounted(os.path.join(work, "src"), mnt, os.path.join(logs, f"{tag}.log")) as m:
                    for step in steps:
                        ctx = workloads.Context(base=m.path, scratch=os.path.join(m.path, "scratch", tag), work=work,
                                                params=params, timeout=step.timeout(params))
                        value = step.run(ctx)
                        results.setdefault((t.name, step.id), []).append(value)
                        print(f"r{r + 1} {t.name:<16} {step.id:<12} {report.fmt(value)} {step.unit}", flush=True)
            finally:
                workloads.cleanup_round(work, tag)
    print()
    print("| workload | unit | " + " | ".join(t.name for t in configs) + " |")
    print("|---|---|" + "---|" * len(configs))
    for step in steps:
        cells = []
        for t in configs:
            values = results.get((t.name, step.id))
            cells.append(report.fmt(statistics.median(values)) if values else "-")
        print(f"| {step.id}: {step.label} | {step.unit} | " + " | ".join(cells) + " |")
    if args.keep_data:
        print(f"\nserver logs: {logs}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
