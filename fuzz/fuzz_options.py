"""Coverage-guided fuzzing (atheris) of what an operator types: mount options, rules and rules files.

Run:     python fuzz/fuzz_options.py -max_total_time=3600 -rss_limit_mb=200
Replay:  python fuzz/fuzz_options.py crash-<hash>

Each input is split into a ``-o`` string, a ``--deny`` spec, a glob with a path to match, and a
rules file. Each must either be accepted or refused with the error the command turns into one
line (UsageError, RuleError, or ValueError from the option checks); any other exception, or a
glob that takes unbounded time, is a finding.
"""

from __future__ import annotations

import logging
import sys

import atheris

from fusepass import cli, policy
from fusepass.mount import MountOptions
from fusepass.serve import parse_mount_options

REFUSALS = (cli.UsageError, policy.RuleError, ValueError)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    options_text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 200))
    deny_spec = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 100))
    glob_text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
    path = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
    rules_file = fdp.ConsumeBytes(fdp.remaining_bytes())

    options = MountOptions()
    try:
        unknown = parse_mount_options(options_text, options)
        cli._mirror_options(unknown)
        options.check()
        assert "," not in options.fusermount_options().split("fsname=", 1)[-1].split(",", 1)[0]
    except REFUSALS:
        pass
    for attempt in (lambda: policy.parse_deny(deny_spec), lambda: policy.parse_rules(rules_file)):
        try:
            attempt()
        except REFUSALS:
            pass
    try:
        glob = policy.Glob(glob_text)
    except policy.RuleError:
        return
    covered = glob.covers(path.strip("/"))
    assert isinstance(covered, bool)
    glob.reaches_below(path.strip("/"))


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
