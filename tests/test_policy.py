"""Rules and the audit log without a mount: glob matching, rule parsing (options and TOML), masks,
and the audit writer's records, rotation and bound."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from fusepass import policy
from fusepass.audit import AuditLog, open_flag_names, rename_flag_names
from fusepass.policy import READ, WRITE, Glob, Policy, RuleError, parse_deny, rules_from_toml
from fusepass.policy_mirror import open_access


@pytest.mark.parametrize(
    "glob, path, covered",
    [
        ("*.key", "a.key", True), ("*.key", "d/e/a.key", True), ("*.key", "a.key/inside", True),
        ("*.key", "a.keys", False), ("*.key", "akey", False),
        ("private/**", "private/x", True), ("private/**", "private/x/y", True), ("private/**", "private", False),
        ("private/**", "other/private/x", False),
        ("private", "private", True), ("private", "private/x", True), ("private", "a/private/x", True),
        ("/build", "build/o", True), ("/build", "src/build", False),
        ("a/*/c", "a/b/c", True), ("a/*/c", "a/b/b/c", False), ("a/**/c", "a/c", True), ("a/**/c", "a/b/b/c/d", True),
        ("f?.txt", "f1.txt", True), ("f?.txt", "f12.txt", False),
        ("[!a]x", "bx", True), ("[!a]x", "ax", False), ("[]x]y", "]y", True), ("[ab", "[ab", True),
        ("[a~~b]x", "~x", True), ("[&&]x", "&x", True), ("[a-c]x", "bx", True),
        ("[+--]x", ",x", True), ("[\\^]x", "^x", True), ("a[.-0]b", "a/b", False), ("a[!x]b", "a/b", False),
        ("**", "", True), ("**", "anything/at/all", True),
    ],
)
def test_glob_covers_the_path_or_one_of_its_directories(glob: str, path: str, covered: bool) -> None:
    assert Glob(glob).covers(path) is covered


@pytest.mark.parametrize(
    "glob, path, below",
    [
        ("private/**", "private", True),  # renaming private would take its contents out of the rule
        ("private/**", "private/x", False),  # covered as a whole: a rename inside keeps it covered
        ("private/**", "public", False),
        ("a/b/c", "a", True), ("a/b/c", "a/b", True), ("a/b/c", "a/x", False),
        ("**/secret", "anything", True),
        ("*.key", "d", False),  # a name rule is not changed by renaming a directory above
    ],
)
def test_glob_reaches_below_a_directory(glob: str, path: str, below: bool) -> None:
    assert Glob(glob).reaches_below(path) is below


@pytest.mark.parametrize("glob", ["", "/", "a//b", "a/../b", "./a"])
def test_bad_globs_are_refused(glob: str) -> None:
    with pytest.raises(RuleError):
        Glob(glob)


def test_deny_spec_parses_keys_and_says_what_is_wrong() -> None:
    rule = parse_deny("private/**,access=write,uid=1000,uid=1001,gid=50,errno=EPERM")
    assert (rule.glob.text, rule.access, rule.uids, rule.gids, rule.errno) == (
        "private/**", WRITE, frozenset({1000, 1001}), frozenset({50}), errno.EPERM)
    assert rule.describe() == "deny write private/** for uid 1000,1001 gid 50 -> EPERM"
    everything = parse_deny("uid=7")
    assert everything.glob.text == "**" and everything.access == READ | WRITE
    for spec, words in [("x,access=sometimes", "access must be"), ("x,uid=me", "uid must be a number"),
                        ("x,errno=EWHAT", "not an errno name"), ("x,colour=red", "unknown key"),
                        ("x,errno=0", "not an errno number")]:
        with pytest.raises(RuleError, match=words):
            parse_deny(spec)


def test_rules_file_gives_rules_and_audit_path(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text('hide = ["*.key", ".git"]\nread_only = "releases"\n'
                 '[[deny]]\npath = "private/**"\nuid = 1000\naccess = "read"\nerrno = 1\n'
                 '[[deny]]\ngid = [100, 101]\n'
                 '[audit]\nlog = "/var/log/a.jsonl"\n')
    rules, audit = rules_from_toml(str(f))
    assert [r.describe() for r in rules] == [
        "hide *.key", "hide .git", "read-only releases", "deny read private/** for uid 1000 -> EPERM",
        "deny ** for gid 100,101 -> EACCES"]
    assert audit == "/var/log/a.jsonl"


@pytest.mark.parametrize(
    "text, words",
    [
        ("hide = [1]", "hide must be a glob"),
        ("colour = 'red'", "unknown key"),
        ("[[deny]]\npath = 'x'\nuser = 3", "unknown key"),
        ("[[deny]]\nuid = 'root'", "uid must be a number"),
        ("[audit]\nfile = 'x'", "takes one key"),
        ("hide = [", "rules.toml"),
    ],
)
def test_bad_rules_files_say_which_file_and_why(tmp_path: Path, text: str, words: str) -> None:
    f = tmp_path / "rules.toml"
    f.write_text(text)
    with pytest.raises(RuleError, match=words) as e:
        rules_from_toml(str(f))
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RuleError, match="No such file"):
        rules_from_toml(str(tmp_path / "missing.toml"))


def test_policy_masks_answer_hidden_and_denied() -> None:
    p = Policy([policy.hide("*.key"), policy.deny("private", uids=[1000], errno="EPERM"),
                policy.read_only("/releases")])
    assert p.needs_paths  # /releases is anchored
    assert p.hidden_by(p.mask("d/a.key")) is p.rules[0]
    assert p.hidden_by(p.mask("d/a.txt")) is None
    private = p.mask("x/private/f")
    assert p.denial(private, 1000, 1000, READ) is p.rules[1]
    assert p.denial(private, 0, 0, READ | WRITE) is None
    releases = p.mask("releases/v1")
    assert p.denial(releases, 0, 0, READ) is None
    assert p.denial(releases, 0, 0, WRITE).errno == errno.EROFS  # type: ignore[union-attr]
    assert p.name_mask("a.key") == 1 and p.name_mask("private") == 2 and p.name_mask("releases") == 0
    assert p.reaches_below("") and not p.reaches_below("releases") and not p.reaches_below("other")
    assert not Policy([policy.hide("*.key")]).needs_paths


def test_open_flags_ask_for_read_write_or_both() -> None:
    assert open_access(os.O_RDONLY) == READ
    assert open_access(os.O_WRONLY) == WRITE
    assert open_access(os.O_RDWR) == READ | WRITE
    assert open_access(os.O_RDONLY | os.O_TRUNC) == READ | WRITE


def test_audit_records_are_json_lines_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit.start()
    audit.record(1000, 100, os.getpid(), "open", "d/f", os.O_WRONLY | os.O_TRUNC, "ok")
    audit.record(0, 0, 2 ** 22 + 1, "rename", "a", 1, "EXDEV", to="b", rule="rename or link across rules")
    audit.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first.keys() == {"time", "uid", "gid", "pid", "exe", "op", "path", "flags", "result"}
    assert (first["uid"], first["gid"], first["pid"], first["op"], first["path"], first["result"]) == (
        1000, 100, os.getpid(), "open", "d/f", "ok")
    assert first["exe"] == os.readlink("/proc/self/exe") and first["flags"] == ["O_WRONLY", "O_TRUNC"]
    assert first["time"].endswith("+00:00")
    assert second["exe"] is None and second["flags"] == ["RENAME_NOREPLACE"]
    assert (second["to"], second["rule"]) == ("b", "rename or link across rules")
    assert oct(path.stat().st_mode & 0o777) == oct(0o600 & ~_umask())
    assert audit.status() == {"log": str(path), "written": 2, "dropped": 0, "queued": 0}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_audit_reopen_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit.start()
    audit.record(0, 0, 1, "unlink", "old", 0, "ok")
    path.rename(tmp_path / "audit.jsonl.1")
    audit.reopen()
    audit.record(0, 0, 1, "unlink", "new", 0, "ok")
    audit.close()
    assert [json.loads(x)["path"] for x in (tmp_path / "audit.jsonl.1").read_text().splitlines()] == ["old"]
    assert [json.loads(x)["path"] for x in path.read_text().splitlines()] == ["new"]


def test_a_full_audit_queue_drops_and_counts(tmp_path: Path) -> None:
    audit = AuditLog(str(tmp_path / "audit.jsonl"), capacity=3)  # no writer yet: the queue fills
    for i in range(5):
        audit.record(0, 0, 1, "open", f"f{i}", 0, "ok")
    assert audit.status()["dropped"] == 2
    audit.close()
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 3


def test_flag_names_keep_unknown_bits() -> None:
    assert open_flag_names(os.O_RDWR | os.O_TMPFILE) == ["O_RDWR", "O_TMPFILE"]
    assert open_flag_names(os.O_RDONLY | 0x40000000) == ["O_RDONLY", "0x40000000"]
    assert rename_flag_names(2 | 16) == ["RENAME_EXCHANGE", "0x10"]


# --- found by fuzz/fuzz_options.py --------------------------------------------------------------

def test_a_glob_that_is_no_valid_pattern_is_a_rule_error_not_a_traceback() -> None:
    with pytest.raises(policy.RuleError, match="not valid"):
        policy.Glob("a[]-[]b")
    with pytest.raises(policy.RuleError, match="not valid"):
        policy.parse_deny("x[z-a],access=write")


def test_many_double_stars_match_in_time_linear_in_the_path() -> None:
    glob = policy.Glob("/" + "/".join(["**"] * 40) + "/x")
    deep = "/".join(["d"] * 60)
    assert not glob.covers(deep)
    assert glob.covers(deep + "/x")
    assert glob.reaches_below(deep)


def test_a_name_with_too_many_stars_is_refused() -> None:
    with pytest.raises(policy.RuleError, match="more than 8"):
        policy.Glob("*a" * 9)
    assert policy.Glob("*a" * 8).covers("a" * 8)
