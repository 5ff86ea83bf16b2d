"""The gateway's Prometheus metrics: one `CollectorRegistry` per `Gateway`, handed to each component.

Every component that counts takes a `Metrics` (default: a fresh one of its own, so a component built on
its own in a test still works). Names start with `mailgate_`; every label takes values from a fixed set
written in the code (a reason such as `unknown_worker`, a state, a notice kind, an endpoint template),
never from a message, so the number of series stays bounded. `docs/operations.md` has the table.

Gauges that describe the store (rows per state, the oldest waiting message) are read from it when
`/metrics` is scraped (`Gateway.refresh_metrics`); the ones in memory (jobs in hand, the API hold, the
storage pauses) are read through callbacks at the same moment.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_QUEUE = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_TURN = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class Metrics:
    """The metrics of one gateway, registered in `registry` (a new one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.remote: list[Family] = []  # the runner process's metrics, when it has its own (`snapshot`)
        self.smtp_replies = Counter(
            "mailgate_smtp_replies",
            "SMTP/LMTP replies that decide on mail, by stage (connect, mail, rcpt, data, session), "
            "code class and reason",
            ["stage", "class", "reason"],
            registry=r,
        )
        self.messages = Counter(
            "mailgate_messages",
            "Inbound messages by the state they ended in (answered, failed, ignored)",
            ["state"],
            registry=r,
        )
        self.turns = Counter(
            "mailgate_turns",
            "Message jobs by how they ended (answered, a notice kind, held, retry, worker_unknown, crashed)",
            ["outcome"],
            registry=r,
        )
        self.api_requests = Counter(
            "mailgate_api_requests",
            "Handinger API requests by method, endpoint template and status (`error`: no response)",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.deliveries = Counter(
            "mailgate_deliveries",
            "Outbox delivery attempts by kind (answer or the notice kind) and the state they left the row in",
            ["kind", "state"],
            registry=r,
        )
        self.retries = Counter(
            "mailgate_retries",
            "Retries scheduled after a transient failure, by stage (api, relay)",
            ["stage"],
            registry=r,
        )
        self.rows = Gauge(
            "mailgate_rows",
            "Rows in the store per table (inbound, outbox) and state, read at scrape time",
            ["table", "state"],
            registry=r,
        )
        self.oldest_waiting = Gauge(
            "mailgate_oldest_waiting_seconds",
            "Age of the oldest inbound message not yet answered, failed or ignored (0: none)",
            registry=r,
        )
        self.jobs_in_hand = Gauge(
            "mailgate_jobs_in_hand",
            "Message jobs (turns being prepared, posted or awaited) and deliveries running now",
            ["loop"],
            registry=r,
        )
        self.api_hold = Gauge(
            "mailgate_api_hold",
            "1 while the API refuses the key (HANDINGER_API_KEY) and all turns are held, else 0",
            registry=r,
        )
        self.storage_paused = Gauge(
            "mailgate_storage_paused",
            "1 while a loop (scheduler, outbox) is paused because the store or the disk fails, else 0",
            ["loop"],
            registry=r,
        )
        self.ready = Gauge("mailgate_ready", "1 when /readyz answers 200, else 0", registry=r)
        self.data_seconds = Histogram(
            "mailgate_smtp_data_seconds",
            "From the end of DATA to the reply (decisions and the durable commit)",
            buckets=_FAST,
            registry=r,
        )
        self.accept_to_post_seconds = Histogram(
            "mailgate_accept_to_post_seconds",
            "From the 250 to the API's 2xx to the turn's POST",
            buckets=_QUEUE,
            registry=r,
        )
        self.turn_seconds = Histogram(
            "mailgate_turn_seconds",
            "From the API's 2xx to the turn's POST to the turn's end",
            buckets=_TURN,
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "mailgate_loop_lag_seconds",
            "How late the event loop ran a timer due every 10 ms (a stall shows as one late wake-up)",
            ["process"],  # gateway (one process), listener, runner
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.end_to_relay_seconds = Histogram(
            "mailgate_end_to_relay_seconds",
            "From the turn's end (the reply queued) to the relay taking the reply",
            buckets=_QUEUE,
            registry=r,
        )

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Read `gauge` (a child with its labels, or a plain gauge) from `read()` at each scrape."""
        gauge.set_function(read)

    def snapshot(self) -> list[Family]:
        """Every metric's samples as plain data (JSON): what the runner process hands the listener."""
        return _families(self.registry)

    def exposition(self) -> bytes:
        """The text format of every metric (what `/metrics` serves), with `remote` (the runner
        process's `snapshot()`) added in: the same series of both processes are summed (a `_created`
        time: the earlier one), so each name appears once."""
        if not self.remote:
            return generate_latest(self.registry)
        return generate_latest(_Merged(self.registry, self.remote))  # type: ignore[arg-type, unused-ignore]


Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]


def _families(registry: CollectorRegistry) -> list[Family]:
    """Every metric of `registry` with its samples, as plain data."""
    return [
        (m.name, m.documentation, m.type, m.unit, [(s.name, s.labels, s.value) for s in m.samples])
        for m in registry.collect()
    ]


class _Merged:
    """A collector with the families of a registry and of a snapshot, series summed by name and labels."""

    def __init__(self, registry: CollectorRegistry, remote: list[Family]) -> None:
        self.registry = registry
        self.remote = remote

    def collect(self) -> list[Metric]:
        families: dict[str, tuple[Metric, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for name, doc, typ, unit, samples in [*_families(self.registry), *self.remote]:
            if name not in families:
                families[name] = (Metric(name, doc, typ, unit), {})
            values = families[name][1]
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                if key not in values:
                    values[key] = value
                elif sample.endswith("_created"):
                    values[key] = min(values[key], value)
                else:
                    values[key] += value
        out = []
        for metric, values in families.values():
            for (sample, pairs), value in values.items():
                metric.add_sample(sample, dict(pairs), value)
            out.append(metric)
        return out
