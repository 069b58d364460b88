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
