"""The bench's closing table: every figure's whole label, beside its baseline."""

from __future__ import annotations

from simulator.report import Report


def test_the_table_keeps_whole_labels_and_lines_up_the_columns() -> None:
    report = Report()
    report.add("alert latency", "MQTT at a police subscriber, p99 at half load", 12.5, "ms",
               5.0, "its own p50")
    report.add("alert latency", "webhook 2xx, p99 at half load", 2_500.0, "ms")
    header, first, second = report.table().splitlines()
    assert first.startswith("alert latency: MQTT at a police subscriber, p99 at half load ")
    assert second.startswith("alert latency: webhook 2xx, p99 at half load ")
    assert "2.50  its own p50" in first  # the ratio to the baseline
    at = header.index("value") + len("value")  # values end under the header's
    assert first[:at].endswith("12.50") and second[:at].endswith("2,500")
