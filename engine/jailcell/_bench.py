"""``jailcell bench``: load the suite (shipped in the wheel, or benchmarks/ in a checkout) and render it."""

from __future__ import annotations

import sys
import time

from ._errors import BackendUnavailable, MissingExtra

WORKLOADS = ["warm_print", "b2b_print", "numpy", "session_cell", "cli", "cold_start", "memory_heavy", "humaneval",
             "leak_soak", "hostile_soak", "ray"]


TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing, pathlib and importlib.util load only when a bench runs: `jailcell --help` lists WORKLOADS)
    from types import ModuleType
    from typing import Any


def load_suite() -> ModuleType:
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for candidate in (here / "benchmarks" / "suite.py", here.parent.parent / "benchmarks" / "suite.py"):
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("jailcell_benchmarks_suite", candidate)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    raise BackendUnavailable("jailcell's benchmark suite is missing; reinstall jailcell")


def run_bench(quick: bool, only: list[str] | None, json_path: str | None, plot_path: str | None) -> int:
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table
    except ImportError as exc:
        raise MissingExtra("jailcell bench", "bench", exc.name) from None
    suite_mod = load_suite()
    console = Console(stderr=True)
    # No refresh thread: it would take the GIL in the middle of timed samples.  The bar is redrawn
    # from the tick, which runs between samples, at most a few times a second.
    with Progress(TextColumn("{task.description:40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, auto_refresh=False) as progress:
        last = [0.0]

        def make_tick(label: str, total: int):
            task = progress.add_task(label, total=total)

            def tick() -> None:
                progress.advance(task)
                now = time.monotonic()
                if now - last[0] > 0.25:
                    last[0] = now
                    progress.refresh()
            return tick

        suite = suite_mod.Suite(quick=quick, only=only, progress=make_tick)
        report = suite.run()
    out = Console() if sys.stdout.isatty() else Console(width=200)  # files and pipes get whole rows
    out.print(_results_table(report, Table))
    out.print(_ratios_table(report, Table))
    if report.get("phases"):
        out.print(_phases_table(report, Table))
    if json_path:
        suite_mod.write_json(report, json_path)
        out.print(f"wrote {json_path}")
    if plot_path:
        suite_mod.plot(report, plot_path)
        out.print(f"wrote {plot_path}")
    return 0


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def _results_table(report: dict[str, Any], Table: Any) -> Any:
    machine = report["machine"]
    t = Table(title=f"jailcell bench ({report['mode']}; {machine['cpus']} CPUs, Python {machine['python']})")
    columns = ("workload", "system", "isolated", "n", "p50 ms", "p99 ms", "throughput/s", "peak RSS MiB",
               "status / note")
    for col in columns:
        t.add_column(col, justify="right" if col[0] in "pnt" and col not in ("status / note",) else "left")
    for s in report["summary"]:
        note = s["note"] if s["status"] == "ok" else f"{s['status'].upper()}: {s['reason']}"
        t.add_row(s["workload"], s["system"], "yes" if s["isolated"] else "NO", str(s["n"]), _ms(s["p50_s"]),
                  _ms(s["p99_s"]), "-" if s["throughput_per_s"] is None else f"{s['throughput_per_s']:.1f}",
                  "-" if not s["peak_rss_bytes"] else f"{s['peak_rss_bytes'] / 2**20:.0f}", note)
    return t


def _ratios_table(report: dict[str, Any], Table: Any) -> Any:
    t = Table(title="ratios (measured in this run)")
    for col in ("ratio", "value", "target", "met"):
        t.add_column(col)
    for r in report["ratios"]:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[r["met"]]
        t.add_row(r["ratio"], "-" if r["value"] is None else f"{r['value']:.2f}",
                  "-" if r["target"] is None else str(r["target"]),
                  met if r["value"] is not None else r.get("reason", "-"))
    return t


def _phases_table(report: dict[str, Any], Table: Any) -> Any:
    """Per-run CPU by phase (ms) for back-to-back print(1): where each system spends it."""
    phases = report["phases"]
    names = list(dict.fromkeys(k for row in phases.values() for k in row if k != "wall"))
    t = Table(title="back-to-back print(1): CPU per run by phase (ms), and wall per run")
    for col in ("system", *names, "CPU in all", "wall"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for system, row in phases.items():
        cpu = sum(v for k, v in row.items() if k != "wall")
        t.add_row(system, *("-" if k not in row else f"{row[k]:.2f}" for k in names), f"{cpu:.2f}",
                  f"{row.get('wall', 0):.2f}")
    return t
