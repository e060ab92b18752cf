"""The long-running commands: `jailcell serve`, `jailcell mcp` and `jailcell daemon` (their option checks
and start), and the audit options they share.  Imported only when one of them runs."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ._cli import EXIT_FAILED, EXIT_OK, _usage


def audit_from(args: argparse.Namespace) -> None:
    """--audit-log/--audit-code reach every Sandbox of this process through the environment."""
    if getattr(args, "audit_log", None):
        os.environ["JAILCELL_AUDIT_LOG"] = os.path.abspath(args.audit_log)
    if getattr(args, "audit_code", False):
        os.environ["JAILCELL_AUDIT_CODE"] = "1"


def run_service(args: argparse.Namespace) -> int:
    return _serve(args) if args.command == "serve" else _mcp(args)


def _serve(args: argparse.Namespace) -> int:
    from ._policy import Policy
    from .integrations.gateway import serve as serve_gateway

    Policy.load(args.policy)
    from .integrations._gateway_guard import is_loopback, redact_url

    if not args.upstream.startswith(("http://", "https://")):
        return _usage(f"--upstream must be an http(s) URL, got {redact_url(args.upstream)!r}")
    if args.no_auth and not is_loopback(args.host):
        return _usage(f"--no-auth is refused with --host {args.host}, which is not a loopback address: every "
                      "machine that reaches it could run code here; set a key (JAILCELL_API_KEY) instead")
    model_map = {}
    for spec in args.model_map:
        name, sep, target = spec.partition("=")
        if not sep or not name or not target:
            return _usage(f"--model-map takes NAME=UPSTREAM, got {spec!r}")
        model_map[name] = target
    env = os.environ
    if args.keys and (args.api_key or env.get("JAILCELL_API_KEY")):
        return _usage("--keys replaces the one shared key: unset JAILCELL_API_KEY and drop --api-key")
    if args.keys and args.no_auth:
        return _usage("--keys and --no-auth contradict each other")
    audit_from(args)
    serve_gateway(args.upstream, host=args.host, port=args.port, log_level=args.log_level,
                  model=args.model, model_map=model_map,
                  api_key=args.api_key or env.get("JAILCELL_API_KEY") or None,
                  upstream_api_key=(args.upstream_api_key or env.get("JAILCELL_UPSTREAM_API_KEY")
                                    or env.get("OPENAI_API_KEY") or None),
                  policy=args.policy, backend=args.backend, max_steps=args.max_steps,
                  max_containers=args.max_containers, container_idle=args.container_idle,
                  upstream_timeout=args.upstream_timeout, ray_address=args.ray_address,
                  no_auth=args.no_auth, allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins,
                  keys=args.keys, metrics=False if args.no_metrics else None)
    return EXIT_OK


def _mcp(args: argparse.Namespace) -> int:
    from ._policy import Policy
    from .integrations.mcp import serve

    Policy.load(args.policy)  # a bad policy is a usage error before anything starts
    audit_from(args)
    serve(args.transport, host=args.host, port=args.port, policy=args.policy, backend=args.backend,
          session_idle=args.session_idle, sessions_per_client=args.sessions_per_client,
          max_sessions=args.max_sessions)
    return EXIT_OK


def run_daemon(args: argparse.Namespace) -> int:
    from . import _daemon as daemon

    path = os.path.abspath(args.socket) if args.socket else daemon.socket_path()
    if args.status or args.stop:
        sock = daemon.connect(path, quiet=False) if path else None
        if sock is None:
            print(f"jailcell: no daemon serves {path}", file=sys.stderr)
            return EXIT_FAILED
        answer = daemon.request(sock, {"op": "stop" if args.stop else "status"})
        if args.stop:
            print(f"jailcell: the daemon at {path} is stopping")
        else:
            import json

            print(json.dumps(answer, indent=2))
        return EXIT_OK

    audit_from(args)
    if args.metrics_port is not None:
        from ._metrics import enable_metrics

        metrics = enable_metrics()
        import prometheus_client

        try:
            prometheus_client.start_http_server(args.metrics_port, addr="127.0.0.1", registry=metrics.registry)
        except (OSError, OverflowError) as exc:
            return _usage(f"--metrics-port {args.metrics_port}: cannot serve metrics on 127.0.0.1 "
                          f"({getattr(exc, 'strerror', None) or exc})")

    def ready(server: Any) -> None:
        print(f"jailcell daemon: serving {server.path} (pid {os.getpid()}, backend {server.backend.name}, "
              f"warm: {', '.join(args.warm or ['standard'])}); `jailcell run` hands its programs here. "
              "Stop with Ctrl-C or `jailcell daemon --stop`.", file=sys.stderr, flush=True)

    daemon.serve(path, warm=args.warm or ["standard"], backend=args.backend, jails=args.jails,
                 max_policies=args.max_policies, on_ready=ready)
    return EXIT_OK
