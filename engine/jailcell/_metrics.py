"""Prometheus metrics (optional: ``pip install "jailcell[metrics]"``, the standard ``prometheus_client``).

Nothing is counted until :func:`enable_metrics` is called (``jailcell serve``/``mcp`` do it, and
``jailcell daemon --metrics-port``): until then every hook is one ``is None`` test.  The metrics live
in a registry of jailcell's own (``enable_metrics().registry``), so an application's default registry
is not touched unless it asks for that.  No label takes unbounded values: policies, statuses,
backends, routes and key names come from configuration, never from a request's content or ids.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

from ._errors import MissingExtra

__all__ = ["enable_metrics"]

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BYTES = tuple(float(mib << 20) for mib in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))

M: Metrics | None = None  # the enabled metrics, or None: the hooks test this and nothing else
_lock = threading.Lock()
_jails: Callable[[], list[tuple[bool, int]]] = list  # (session?, spare cells) of each live jail


def jails_from(source: Callable[[], list[tuple[bool, int]]]) -> None:
    """Where a scrape finds the live jails (set by ``_host._jail``: no import runs up the layers)."""
    global _jails
    _jails = source


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Around a run's wait for a jail (a Sandbox's lock, a Pool's queue): counted in jailcell_runs_waiting."""
    m = M
    if m is None:
        yield
        return
    m.waiting.inc()
    try:
        yield
    finally:
        m.waiting.dec()


def jail_started(backend: str) -> None:
    if M is not None:
        M.jail_starts.labels(backend).inc()


def jail_failed(backend: str, cause: str) -> None:
    """A jail that did not start, counted by cause: the backend refused (``unavailable``), it did not
    answer in time (``timeout``), the host ran out of descriptors or disk (``resources``), or else
    (``error``) -- decided where it failed (``_host/_jail``)."""
    if M is not None:
        M.jail_failures.labels(backend, cause).inc()


class Metrics:
    """Every metric jailcell exports, in one registry."""

    def __init__(self, registry: Any = None) -> None:
        try:
            import prometheus_client as prom
            from prometheus_client.core import GaugeMetricFamily
        except ImportError as exc:
            raise MissingExtra("metrics", "metrics", exc.name) from None
        if registry is None:
            registry = prom.CollectorRegistry()
            prom.ProcessCollector(registry=registry)
            prom.PlatformCollector(registry=registry)
        self.registry = registry
        self._prom = prom
        r = registry
        self.runs = prom.Counter("jailcell_runs", "Runs finished, by policy, status and backend",
                                 ["policy", "status", "backend"], registry=r)
        self.run_seconds = prom.Histogram("jailcell_run_duration_seconds", "Wall-clock time of a run in its cell",
                                          ["policy"], buckets=SECONDS, registry=r)
        self.run_cpu = prom.Histogram("jailcell_run_cpu_seconds", "CPU time of a run", ["policy"],
                                      buckets=SECONDS, registry=r)
        self.run_memory = prom.Histogram("jailcell_run_peak_memory_bytes", "Peak memory of a run's cell",
                                         ["policy"], buckets=BYTES, registry=r)
        self.key_runs = prom.Counter("jailcell_key_runs", "Runs by the name of the key that asked for them",
                                     ["key"], registry=r)
        self.host_calls = prom.Counter("jailcell_host_function_calls", "Calls of host functions from programs",
                                       ["function"], registry=r)
        self.waiting = prom.Gauge("jailcell_runs_waiting", "Runs waiting for a free jail", registry=r)
        self.jail_starts = prom.Counter("jailcell_jail_starts", "Jails started", ["backend"], registry=r)
        self.jail_failures = prom.Counter("jailcell_jail_start_failures", "Jails that failed to start, by cause",
                                          ["backend", "cause"], registry=r)
        self.audit_lines = prom.Counter("jailcell_audit_lines", "Audit lines written", registry=r)
        self.audit_errors = prom.Counter("jailcell_audit_write_errors", "Audit lines that could not be written",
                                         registry=r)
        self.http = prom.Counter("jailcell_http_requests", "HTTP requests served, by service, route and status",
                                 ["service", "route", "status"], registry=r)
        self.http_seconds = prom.Histogram("jailcell_http_request_duration_seconds", "Time to answer an HTTP request",
                                           ["service", "route"], buckets=SECONDS, registry=r)
        self.upstream = prom.Counter("jailcell_upstream_requests", "Model calls to the upstream, by outcome",
                                     ["status"], registry=r)
        self.upstream_seconds = prom.Histogram("jailcell_upstream_request_duration_seconds",
                                               "Time of one model call to the upstream", buckets=SECONDS, registry=r)
        self.limited = prom.Counter("jailcell_rate_limited_requests", "Requests refused with 429, by key and limit",
                                    ["key", "limit"], registry=r)
        self._open: dict[str, Any] = {}  # "containers" / "sessions" -> a callable counting them now

        metrics = self

        class _Live:
            """Jails and spare cells alive, counted when scraped (nothing on the hot path)."""

            def collect(self) -> Any:
                jails = GaugeMetricFamily("jailcell_jails", "Jails alive, by kind", labels=["kind"])
                spares = GaugeMetricFamily("jailcell_spare_cells", "Warm cells waiting for a run")
                counts = {"stateless": 0, "session": 0}
                idle = 0
                for session, spare in _jails():
                    counts["session" if session else "stateless"] += 1
                    idle += spare
                for kind, n in counts.items():
                    jails.add_metric([kind], n)
                spares.add_metric([], idle)
                yield jails
                yield spares
                for name, count in list(metrics._open.items()):
                    gauge = GaugeMetricFamily(f"jailcell_{name}_open", f"{name.capitalize()} open now")
                    gauge.add_metric([], count())
                    yield gauge

        r.register(_Live())

    def count_open(self, name: str, count: Any) -> None:
        """Export ``jailcell_<name>_open``, read from ``count()`` at each scrape."""
        self._open[name] = count

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of a scrape."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


def enable_metrics(registry: Any = None) -> Metrics:
    """Start counting (idempotent); returns the metrics, whose ``registry`` a scrape reads.  Raises
    MissingExtra without ``prometheus_client``."""
    global M
    with _lock:
        if M is None:
            M = Metrics(registry)
        return M
