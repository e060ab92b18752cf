"""jailcell's benchmark suite (run it with `jailcell bench`); see suite.py."""
