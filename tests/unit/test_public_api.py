"""The curated public surface: what `import jailcell` offers, one version source, typed."""

import importlib.metadata
from pathlib import Path

import jailcell


def test_exports_and_version():
    for name in ("Sandbox", "AsyncSandbox", "Session", "AsyncSession", "Pool", "Result", "STATUSES", "Status",
                 "Policy", "Limits", "Imports", "JailcellError", "PolicyError", "InputError", "BackendUnavailable",
                 "JailError", "SandboxClosed", "UsageError", "MissingExtra"):
        assert name in jailcell.__all__ and hasattr(jailcell, name), name
    assert jailcell.__version__ == importlib.metadata.version("jailcell")
    assert (Path(jailcell.__file__).parent / "py.typed").is_file()


def test_every_jailcell_error_is_one_family():
    for cls in (jailcell.PolicyError, jailcell.InputError, jailcell.BackendUnavailable, jailcell.JailError,
                jailcell.SandboxClosed, jailcell.UsageError, jailcell.MissingExtra):
        assert issubclass(cls, jailcell.JailcellError)
    assert issubclass(jailcell.MissingExtra, ImportError)
    assert set(jailcell.STATUSES) == {"ok", "error", "timeout", "memory_limit", "output_limit", "killed",
                                      "policy_violation"}
