"""The request path is typed end to end: a misspelled request field, or a handler paired with the
wrong parser, fails the type check. Run on a copy of the package with one deliberate mistake."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

REPO = Path(__file__).resolve().parent.parent
GETATTR = "return self.fs.getattr(ctx, r.header.nodeid, r.fh)"
LOOKUP_ROUTE = "((O.LOOKUP,), _route(p.parse_lookup, self._lookup, self._entry_body)"
READ_PARSE = "return Read(h, fh, offset, self._bounded(size, self.max_reply, \"size\", h), read_flags, owner, flags)"


def check(tmp_path: Path, path: str, old: str, new: str) -> tuple[str, int]:
    copy = tmp_path / "src"
    shutil.copytree(REPO / "fusepass", copy / "fusepass")
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    target = copy / path
    text = target.read_text()
    assert text.count(old) == 1, f"the line to break is not in {path} exactly once"
    target.write_text(text.replace(old, new))
    out, err, status = mypy_api.run(["--config-file", str(copy / "pyproject.toml"), "--cache-dir",
                                     str(tmp_path / "cache"), str(copy / "fusepass")])
    return out + err, status


def test_the_unchanged_package_passes(tmp_path: Path) -> None:
    out, status = check(tmp_path, "fusepass/dispatch.py", GETATTR, GETATTR)
    assert status == 0, out


@pytest.mark.parametrize(("path", "old", "new", "complaint"), [
    ("fusepass/dispatch.py", GETATTR, GETATTR.replace("r.fh)", "r.fh_typo)"), '"Getattr" has no attribute "fh_typo"'),
    ("fusepass/dispatch.py", LOOKUP_ROUTE, LOOKUP_ROUTE.replace("parse_lookup", "parse_unlink"), "_route"),
    ("fusepass/protocol.py", READ_PARSE, READ_PARSE.replace("read_flags, owner", "owner"), "Read"),
])
def test_a_mistake_on_the_request_path_fails_the_type_check(
    tmp_path: Path, path: str, old: str, new: str, complaint: str
) -> None:
    out, status = check(tmp_path, path, old, new)
    assert status == 1 and complaint in out, out
