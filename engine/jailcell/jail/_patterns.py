"""Module-name patterns of an import policy: the one definition the host (``Policy.imports``)
and the jail (the import guard) both use.  Stdlib only: the jail imports it by file name.

A pattern without glob characters is a module name and covers its submodules too (``os`` matches
``os`` and ``os.path``).  A glob (``numpy.*``, ``nump?``, ``[n]umpy``) is matched against the whole
dotted name, case-sensitively as module names are, and covers only what it spells (``numpy.*``
matches the submodules of numpy, not numpy itself).
"""

from __future__ import annotations

GLOB_CHARS = frozenset("*?[")


class ModulePatterns:
    """A list of module patterns, matched in one dict lookup per dotted prefix (and one regex,
    compiled only if there are globs: the jail starts without ``re``)."""

    __slots__ = ("names", "glob")

    def __init__(self, patterns) -> None:
        globs = [p for p in patterns if GLOB_CHARS.intersection(p)]
        self.names = frozenset(p for p in patterns if p not in globs)
        self.glob = None
        if globs:
            import fnmatch
            import re

            self.glob = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in globs), re.S)

    def match(self, module: str) -> bool:
        names = self.names
        if module in names:
            return True
        dot = module.find(".")
        while dot != -1:
            if module[:dot] in names:
                return True
            dot = module.find(".", dot + 1)
        return self.glob is not None and self.glob.match(module) is not None


def matcher(patterns) -> ModulePatterns | None:
    """The patterns compiled, or None for an empty list (a policy without that list)."""
    return ModulePatterns(patterns) if patterns else None


def blocked(module: str, deny: ModulePatterns | None, allow: ModulePatterns | None) -> bool:
    """A policy's rule: denied if a deny pattern matches; otherwise, if there is an allow list,
    denied unless an allow pattern matches."""
    if deny is not None and deny.match(module):
        return True
    return allow is not None and not allow.match(module)
