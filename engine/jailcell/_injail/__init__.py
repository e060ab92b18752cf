"""The code that runs inside a jail: the zygote, the nursery, session holders and cells.

This folder is the only code mounted into a jail (read-only, at ``/jailcell/injail``), where it
runs as flat modules with this folder on ``sys.path``; it imports nothing but the standard library
(RestrictedPython, for the restricted code mode, comes from the interpreter's own site-packages).
The host imports one module of it: ``_protocol``, the framing and the import-policy patterns both
sides share.
"""
