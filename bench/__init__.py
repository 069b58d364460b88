"""fusepass's benchmark against native and the Python peers (issue 6): ``python -m bench``; see bench/README.md."""
