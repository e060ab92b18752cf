"""The weaker fallback: a plain child process with rlimits, a new session and a clean environment.

Used when nsjail cannot create namespaces here (non-root without user namespaces, Ubuntu
24.04's AppArmor restriction, unprivileged containers).  It is *not* a security boundary
against the host: the program can read whatever this user can read.  Every Result says so
in ``isolation``, and jailcell says it once on stderr.
"""

from __future__ import annotations

import os
import resource
import subprocess
from typing import Any

from .._policy import MIB, Policy
from ._base import JAIL_SRC, Backend, Spawned, make_root, remove_root, slim_processes, user_processes, zygote_argv
from ._layout import python_layout


class ProcessBackend(Backend):
    name = "process"

    def spawn(self, policy: Policy, *, session: bool, stderr: Any, channel: int) -> Spawned:
        lim = policy.limits
        root, workspace, tmp = make_root()
        nproc = user_processes() + lim.pids + 4 + slim_processes(policy, session)

        def limits() -> None:  # runs in the child before exec
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_size_mib * MIB,) * 2)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lim.open_files,) * 2)
            try:
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            except (ValueError, OSError):
                pass

        config = self.zygote_config(policy, session=session, workspace=workspace, tmp=tmp,
                                    pid_namespace=False, rlimit_as=True)
        env = self.env(policy, tmp=tmp, home=workspace)
        proc = subprocess.Popen(
            zygote_argv(python_layout().python, str(JAIL_SRC / "zygote.py")),
            stdin=channel, stdout=channel, stderr=stderr, env=env, cwd=workspace,
            close_fds=True, start_new_session=True, preexec_fn=limits,
        )
        return Spawned(proc, config, {"root": root})

    def teardown(self, spawned: Spawned) -> None:
        remove_root(spawned)

    def isolation(self, policy: Policy) -> dict[str, Any]:
        return {
            "backend": "process",
            "namespaces": [],
            "user": f"host uid {os.getuid()} (same user as jailcell)",
            "seccomp": False,
            "cgroup": None,
            "memory_limit": "rlimit_as",
            "pids_limit": "rlimit_nproc",
            "network": "host network (no network namespace)",
            "filesystem": "host filesystem readable as this user; private workspace and TMPDIR",
            "rlimits": ["cpu", "fsize", "nofile", "nproc", "core=0", "as"],
            "degraded": [
                "no namespaces: the program can read this user's files and reach the network",
                "no seccomp filter", "no cgroups",
            ],
        }
