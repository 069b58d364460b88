"""Sphinx configuration: the API reference is generated from the docstrings (autodoc)."""

project = "fusepass"
author = "the fusepass authors"
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
exclude_patterns = ["_build", "bench"]
html_theme = "alabaster"
html_title = "fusepass"

# Names that modules import only for type checking, given to them here so that autodoc can resolve
# every annotation of a signature (an unresolved one is rendered by name, and "Operations" alone
# would be ambiguous between fusepass.ops and fusepass.compat).
import asyncio  # noqa: E402

import fusepass.session  # noqa: E402

fusepass.session.asyncio = asyncio  # type: ignore[attr-defined]
