"""A minimal Prometheus text-format registry (counters, gauges, histograms), no dependency.

Format: https://prometheus.io/docs/instrumenting/exposition_formats/ (version 0.0.4).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable, Optional, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, v in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(v)}"


class Gauge(_Metric):
    """Either set explicitly or read from a callback at scrape time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        read: Optional[Callable[[], dict[LabelValues, float]]] = None,
    ) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}
        self._read = read

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def clear(self) -> None:
        self._values.clear()

    def samples(self) -> Iterable[str]:
        values = self._read() if self._read else self._values
        for key, v in sorted(values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(v)}"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[LabelValues, list] = {}  # key -> [counts per bucket, count, sum]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        series = self._series.setdefault(key, [[0] * len(self.buckets), 0, 0.0])
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            series[0][i] += 1
        series[1] += 1
        series[2] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return series[1] if series else 0

    def samples(self) -> Iterable[str]:
        for key, (counts, total, acc) in sorted(self._series.items()):
            cumulative = 0
            for bound, c in zip(self.buckets, counts):
                cumulative += c
                le = _labels(self.label_names, key, 'le="%s"' % _number(bound))
                yield f"{self.name}_bucket{le} {cumulative}"
            le = _labels(self.label_names, key, 'le="+Inf"')
            yield f"{self.name}_bucket{le} {total}"
            yield f"{self.name}_sum{_labels(self.label_names, key)} {_number(acc)}"
            yield f"{self.name}_count{_labels(self.label_names, key)} {total}"


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        return "".join(m.render() for m in self._metrics.values())
