"""Access rules an operator writes instead of Python: hide names, deny access, read-only subtrees.

A rule names files by a glob over paths relative to the source directory. ``*`` and ``?``
match within one name, ``[...]`` is a character class, and ``**`` as a whole name matches
any number of directories. A glob without a ``/`` matches a name at any depth (``*.key``);
one with a ``/`` (a leading one is allowed) is anchored at the source root (``private/**``,
``/build``). A rule that matches a directory covers everything beneath it.

Rules come from ``fusepass mount`` options and from a TOML file (``rules_from_toml``). The
enforcement is in ``fusepass.policy_mirror``; this module only parses and matches, so every
rule is testable without a mount. Each rule is one bit of a mask: the mirror computes a
path's mask once and asks it questions (hidden? denied to this caller for this access?).
"""

from __future__ import annotations

import errno as errnomod
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

READ, WRITE = 1, 2
ACCESS = {"read": READ, "write": WRITE, "any": READ | WRITE}
_ACCESS_NAME = {v: k for k, v in ACCESS.items()}


class RuleError(ValueError):
    """A rule that cannot be understood; the message says which and why, in one line."""


class Glob:
    """A path glob (syntax in the module docstring), matched with "covers everything beneath"."""

    __slots__ = ("text", "anchored", "_covers", "_name", "_parts")

    def __init__(self, text: str) -> None:
        body = text.strip("/")
        if not body:
            raise RuleError(f"empty glob {text!r}")
        parts = body.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise RuleError(f"glob {text!r} has an empty, '.' or '..' name")
        if any(p.count("*") > _MAX_STARS for p in parts if p != "**"):
            raise RuleError(f"glob {text!r} has more than {_MAX_STARS} '*' in one name")
        # "**/**" means what "**" means; collapsed, a glob cannot make matching take exponential time.
        parts = [p for i, p in enumerate(parts) if not (p == "**" and i and parts[i - 1] == "**")]
        self.text = text
        self.anchored = text.startswith("/") or len(parts) > 1
        try:
            if self.anchored:
                self._covers = re.compile(_translate(parts) + r"(?:/|\Z)")
                self._name = None
            else:
                self._covers = re.compile(r"(?:\A|.*/)" + _translate(parts) + r"(?:/|\Z)")
                self._name = re.compile(_translate(parts) + r"\Z")
            self._parts = [p if p == "**" else re.compile(_component(p) + r"\Z") for p in parts]
        except re.error as e:
            raise RuleError(f"glob {text!r} is not valid: {e}") from None

    def covers(self, path: str) -> bool:
        """Whether ``path`` (relative, "" for the root) or one of its directories matches."""
        return self._covers.match(path) is not None

    def matches_name(self, name: str) -> bool:
        """For a glob without '/': whether ``name`` matches (its directories are not looked at)."""
        return self._name is not None and self._name.match(name) is not None

    def reaches_below(self, path: str) -> bool:
        """Whether the glob could match something strictly beneath ``path`` without matching
        ``path`` or its directories: renaming ``path`` would change what the rule covers."""
        if not self.anchored:
            return False  # it looks at names, which a rename of a directory above leaves alone
        return not self.covers(path) and _below(self._parts, 0, path.split("/") if path else [], 0)


_MAX_STARS = 8  # '*' per name: more makes a regular expression that can backtrack for long


def _translate(parts: Sequence[str]) -> str:
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
        else:
            out.append(_component(part) + ("" if last else "/"))
    return "".join(out)


def _component(part: str) -> str:
    """One name of a glob as a regular expression (never matching '/')."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := _class_end(part, i)) > 0:
            inner = part[i + 1:end]
            negate = inner.startswith("!")
            members = _class_members(inner[1:] if negate else inner)
            out.append("[^/" + members + "]" if negate else "(?!/)[" + members + "]")  # a range may span '/'
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _class_members(inner: str) -> str:
    """A glob class's characters and ranges as a regular expression's, each one escaped (so that
    nothing in it reads as a regex set operation); a range that runs backwards is an error."""
    out, k = [], 0
    while k < len(inner):
        if k + 2 < len(inner) and inner[k + 1] == "-":
            first, last = inner[k], inner[k + 2]
            if first > last:
                raise re.error(f"range {first}-{last} runs backwards")
            out.append(re.escape(first) + "-" + re.escape(last))
            k += 3
        else:
            out.append(re.escape(inner[k]))
            k += 1
    return "".join(out)


def _class_end(part: str, start: int) -> int:
    """The index of the ']' closing the class opened at ``start``, or -1 (a lone '[' is literal)."""
    j = start + 1
    if part[j:j + 1] == "!":
        j += 1
    if part[j:j + 1] == "]":
        j += 1
    return part.find("]", j)


def _below(pattern: list[Any], i: int, path: list[str], j: int) -> bool:
    """Whether ``pattern[i:]`` can match ``path[j:]`` followed by at least one more name
    (remembering each (i, j) answered, so that "**" costs no more than pattern x path)."""
    seen: dict[tuple[int, int], bool] = {}

    def below(i: int, j: int) -> bool:
        key = (i, j)
        if key not in seen:
            if j == len(path):
                seen[key] = i < len(pattern)
            elif i == len(pattern):
                seen[key] = False  # matched a directory of the path: that is covering, not reaching below
            elif pattern[i] == "**":
                seen[key] = below(i + 1, j) or below(i, j + 1)
            else:
                seen[key] = pattern[i].match(path[j]) is not None and below(i + 1, j + 1)
        return seen[key]

    return below(i, j)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. ``kind`` is "hide", "deny" or "read_only" (a deny of writes answering EROFS).
    A deny applies to callers whose uid is in ``uids`` and whose gid is in ``gids`` (empty:
    anyone; the gid is the caller's primary group, the only one FUSE tells the server) and to
    the ``access`` asked: READ (opening to read, listing), WRITE (opening to write or truncate,
    and every change: create, remove, rename, link, attributes) or both."""

    kind: str
    glob: Glob
    access: int = READ | WRITE
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    errno: int = errnomod.EACCES

    def applies(self, uid: int, gid: int, access: int) -> bool:
        return (self.access & access != 0 and (not self.uids or uid in self.uids)
                and (not self.gids or gid in self.gids))

    def describe(self) -> str:
        if self.kind == "hide":
            return f"hide {self.glob.text}"
        if self.kind == "read_only":
            return f"read-only {self.glob.text}"
        who = [f"uid {','.join(map(str, sorted(self.uids)))}"] if self.uids else []
        who += [f"gid {','.join(map(str, sorted(self.gids)))}"] if self.gids else []
        scope = f" for {' '.join(who)}" if who else ""
        access = "" if self.access == READ | WRITE else f" {_ACCESS_NAME[self.access]}"
        return f"deny{access} {self.glob.text}{scope} -> {errnomod.errorcode.get(self.errno, self.errno)}"


def hide(glob: str) -> Rule:
    return Rule("hide", Glob(glob))


def read_only(glob: str) -> Rule:
    return Rule("read_only", Glob(glob), access=WRITE, errno=errnomod.EROFS)


def deny(glob: str = "**", access: str = "any", uids: Iterable[int] = (), gids: Iterable[int] = (),
         errno: int | str = errnomod.EACCES) -> Rule:
    if access not in ACCESS:
        raise RuleError(f"access must be read, write or any, not {access!r}")
    return Rule("deny", Glob(glob), ACCESS[access], frozenset(uids), frozenset(gids), errno_value(errno))


def errno_value(value: int | str) -> int:
    """An errno from its name ("EPERM") or number."""
    if isinstance(value, int) or value.isdigit():
        number = int(value)
        if number not in errnomod.errorcode or number == 0:
            raise RuleError(f"{value} is not an errno number")
        return number
    found = getattr(errnomod, value.upper(), None)
    if not isinstance(found, int) or not value.upper().startswith("E"):
        raise RuleError(f"{value!r} is not an errno name (like EACCES or EPERM)")
    return found


def parse_deny(spec: str) -> Rule:
    """``GLOB[,access=read|write|any][,uid=N]...[,gid=N]...[,errno=NAME]`` (from ``--deny``);
    a spec that starts with a ``key=`` applies to every path."""
    glob, access, err = "**", "any", "EACCES"
    uids: list[int] = []
    gids: list[int] = []
    for i, item in enumerate(spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq and i == 0:
            glob = item
            continue
        if key == "access":
            access = value
        elif key in ("uid", "gid"):
            if not value.isdigit():
                raise RuleError(f"--deny {spec!r}: {key} must be a number, not {value!r}")
            (uids if key == "uid" else gids).append(int(value))
        elif key == "errno":
            err = value
        else:
            raise RuleError(f"--deny {spec!r}: unknown key {item!r} (access=, uid=, gid=, errno=)")
    try:
        return deny(glob, access, uids, gids, err)
    except RuleError as e:
        raise RuleError(f"--deny {spec!r}: {e}") from None


_TOML_KEYS = {"hide", "read_only", "deny", "audit"}
_DENY_KEYS = {"path", "access", "uid", "gid", "errno"}


def rules_from_toml(path: str) -> tuple[list[Rule], str | None]:
    """Read a rules file: its rules and its audit log path (``[audit] log``), if any. The format::

        hide = ["*.key", ".git"]
        read_only = ["releases"]
        [[deny]]
        path = "private/**"       # default: everything
        access = "write"          # read, write or any (default)
        uid = [1000]              # default: every caller; also gid = [...]
        errno = "EPERM"           # default EACCES
        [audit]
        log = "/var/log/fusepass-audit.jsonl"
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise RuleError(f"rules file {path}: {e.strerror}") from None
    return parse_rules(text, f"rules file {path}")


def parse_rules(text: bytes, origin: str = "rules") -> tuple[list[Rule], str | None]:
    """The rules and audit log path of a rules file's contents (``origin`` names it in errors)."""
    try:
        doc = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise RuleError(f"{origin}: {e}") from None
    try:
        return _rules_from_doc(doc)
    except RuleError as e:
        raise RuleError(f"{origin}: {e}") from None


def _rules_from_doc(doc: dict[str, Any]) -> tuple[list[Rule], str | None]:
    unknown = set(doc) - _TOML_KEYS
    if unknown:
        raise RuleError(f"unknown key(s) {', '.join(sorted(unknown))} (hide, read_only, [[deny]], [audit])")
    rules = [hide(g) for g in _strings(doc, "hide")] + [read_only(g) for g in _strings(doc, "read_only")]
    denies = doc.get("deny", [])
    if not isinstance(denies, list) or not all(isinstance(d, dict) for d in denies):
        raise RuleError("deny must be a list of tables ([[deny]])")
    for d in denies:
        unknown = set(d) - _DENY_KEYS
        if unknown:
            raise RuleError(f"[[deny]]: unknown key(s) {', '.join(sorted(unknown))} (path, access, uid, gid, errno)")
        ids = {k: d.get(k, []) for k in ("uid", "gid")}
        for k, v in ids.items():
            if isinstance(v, int):
                ids[k] = [v]
            elif not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise RuleError(f"[[deny]]: {k} must be a number or a list of numbers")
        if not isinstance(d.get("path", "**"), str) or not isinstance(d.get("access", "any"), str):
            raise RuleError("[[deny]]: path and access must be strings")
        err = d.get("errno", "EACCES")
        if not isinstance(err, str | int) or isinstance(err, bool):
            raise RuleError("[[deny]]: errno must be a name or a number")
        rules.append(deny(d.get("path", "**"), d.get("access", "any"), ids["uid"], ids["gid"], err))
    audit = doc.get("audit", {})
    if not isinstance(audit, dict) or set(audit) - {"log"} or not isinstance(audit.get("log", ""), str):
        raise RuleError('[audit] takes one key, log = "FILE"')
    return rules, audit.get("log")


def _strings(doc: dict[str, Any], key: str) -> list[str]:
    value = doc.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleError(f"{key} must be a glob or a list of globs")
    return value


class Policy:
    """A set of rules, asked by mask: rule number i is bit i."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self.hide_mask = sum(1 << i for i, r in enumerate(self.rules) if r.kind == "hide")
        self._globs = [(1 << i, r.glob) for i, r in enumerate(self.rules)]
        self._named = [(1 << i, r.glob) for i, r in enumerate(self.rules) if not r.glob.anchored]
        self._denies = [(1 << i, r) for i, r in enumerate(self.rules) if r.kind != "hide"]
        #: Whether any rule needs the whole path (else a name and its directory's mask suffice).
        self.needs_paths = any(r.glob.anchored for r in self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def mask(self, path: str) -> int:
        """The rules that cover ``path`` (relative to the source root)."""
        return sum(bit for bit, glob in self._globs if glob.covers(path))

    def name_mask(self, name: str) -> int:
        """The name-only rules (globs without '/') that match ``name`` itself."""
        return sum(bit for bit, glob in self._named if glob.matches_name(name))

    def denial(self, mask: int, uid: int, gid: int, access: int) -> Rule | None:
        """The first deny or read-only rule in ``mask`` that refuses this caller this access."""
        for bit, rule in self._denies:
            if mask & bit and rule.applies(uid, gid, access):
                return rule
        return None

    def hidden_by(self, mask: int) -> Rule | None:
        hidden = mask & self.hide_mask
        return self.rules[(hidden & -hidden).bit_length() - 1] if hidden else None

    def reaches_below(self, path: str) -> bool:
        """Whether renaming the directory ``path`` would change the rules of what is beneath it."""
        return any(glob.reaches_below(path) for _, glob in self._globs)
