"""``/metrics``: Prometheus text format, computed from the job store at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.models import JobState
from services.reconciler import Reconciler
from services.store import JobStore


class JobCollector(Collector):
    def __init__(self, store: JobStore, reconciler: Reconciler) -> None:
        self.store, self.reconciler = store, reconciler

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("distillery_jobs", "Jobs by state", labels=["state"])
        for state, n in self.store.counts_by_state().items():
            jobs.add_metric([state.value], n)
        yield jobs
        running = [j for j in self.store.active() if j.state == JobState.RUNNING and j.progress]
        yield GaugeMetricFamily("distillery_examples_per_second", "Examples per second, all running jobs",
                                value=sum(j.progress.examples_per_s for j in running))
        yield GaugeMetricFamily("distillery_target_tokens_per_second", "Target tokens per second, all running jobs",
                                value=sum(j.progress.tokens_per_s for j in running))
        yield GaugeMetricFamily("distillery_examples_done", "Examples done by the running jobs",
                                value=sum(j.progress.examples_done for j in running))
        yield GaugeMetricFamily("distillery_ray_up", "1 if the last sync reached Ray's job server",
                                value=float(self.reconciler.ray_reachable))


def render(store: JobStore, reconciler: Reconciler) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(store, reconciler))
    return generate_latest(registry)
