"""``python -m bench [--quick] [--rounds N] [--configs ...] [--workloads ...]``: see bench/README.md."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from . import environment as envmod
from . import workloads
from .report import CONFIG_ORDER


def _names(allowed: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or 'empty list'}; choose from {','.join(allowed)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark fusepass against native and the "
                                "Python peers, interleaving configurations round by round.")
    p.add_argument("--quick", action="store_true", help="small sizes and one round (about five minutes)")
    p.add_argument("--rounds", type=int, help="rounds (default 3, or 1 with --quick)")
    p.add_argument("--configs", type=_names(CONFIG_ORDER), default=CONFIG_ORDER,
                   help="comma-separated subset of " + ",".join(CONFIG_ORDER))
    p.add_argument("--workloads", type=_names(workloads.WORKLOADS), default=workloads.WORKLOADS,
                   help="comma-separated subset of " + ",".join(workloads.WORKLOADS))
    p.add_argument("--workdir", default="/var/tmp/fusepass-bench",
                   help="where the source and the mount points go (default /var/tmp/fusepass-bench; removed after)")
    p.add_argument("--keep-data", action="store_true", help="keep the work directory, and reuse it next time")
    p.add_argument("--results", default=str(envmod.BENCH_DIR / "results"),
                   help="results folder (default bench/results)")
    p.add_argument("--visibility-changes", type=int, help="changes the visibility workload makes (default 1,000; 50 "
                   "with --quick)")
    p.add_argument("--churn-files", type=int, help="files the churn workload's writer creates (default 100,000; "
                   "10,000 with --quick)")
    p.add_argument("--threads", type=int, help="fusepass worker threads (default: fusepass's own)")
    p.add_argument("--fusepass-opts", help="extra -o options for fusepass mount, e.g. timeout=5")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every step's time limit (e.g. 0.1 to exercise the recovery from a stuck mount)")
    p.add_argument("--no-setup", action="store_true", help="install nothing; use bench/.venv as it is")
    p.add_argument("--libfuse-tarball", default=envmod.default_libfuse_tarball(),
                   help=f"libfuse source to build passthrough_hp from (default: ${envmod.LIBFUSE_TARBALL_ENV}, "
                   "else the shared peers folder beside the repository); without one, passthrough_hp is not run")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench: warning: not root; mounting may fail", file=sys.stderr)
    if os.environ.get(envmod.IN_VENV) != "1" and not envmod.running_in_venv():
        if not args.no_setup:
            envmod.ensure(lambda text: print(text, flush=True), args.libfuse_tarball)
        if envmod.venv_python().exists():
            envmod.reexec_in_venv(argv)
        print(f"bench: no virtualenv at {envmod.VENV}: running without peers, charts or progress bar", file=sys.stderr)
    from .runner import run

    return run(args, envmod.load_state(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
