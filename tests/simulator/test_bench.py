"""The benchmark command runs and prints every in-process figure (numbers are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ingest.broker import BrokerHandle
from ingest.clock import wall_ms
from simulator.bench import _Receiver, run_soak


def test_bench_quick_prints_matching_and_decode_tables(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "ingest.cli", "bench", "--quick", "--skip-e2e",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "hot-path matching" in p.stdout and "decode, ns per read" in p.stdout
    assert "100,000 10,000" in p.stdout
    assert "CPU per heartbeat" in p.stdout and "/metrics render" in p.stdout
    assert "next_stations on a simulated town" in p.stdout and "nearest ahead" in p.stdout
    assert "Registry: 20,000 vehicles" in p.stdout and "lookup by plate as police" in p.stdout
    assert "fold into visits" in p.stdout and "100,000 open visits" in p.stdout
    assert "every figure beside its baseline from this run" in p.stdout
    doc = json.loads(out.read_text())
    sections = {f["section"] for f in doc["figures"]}
    assert sections == {"matching", "decode", "fold", "station health", "next_stations",
                        "registry"}
    assert all(f["value"] > 0 and f["baseline"] > 0 and f["ratio"] > 0 for f in doc["figures"])
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["python"]


async def test_the_soak_samples_one_worker_in_a_process_of_its_own(broker: BrokerHandle) -> None:
    run = await run_soak(broker.address(), 3.0, 200.0, None, sample_s=1.0)
    assert run.reads_per_s > 100 * 50  # at 200 batches/s of 50 reads, less the warm-up
    assert len(run.rss_samples) >= 2
    assert run.rss_before > 0 and run.rss_end > 0
    assert run.pid != os.getpid()


def test_the_police_subscriber_notes_when_each_alert_arrived(broker: BrokerHandle) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    police = _Receiver("police", "--port", str(broker.port), "--root", "policetest")
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="police-test-pub")
    pub.username_pw_set("bikewatch", "bikewatch")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    before = wall_ms()
    for i, zone in enumerate(("z1", "z2")):
        pub.publish(f"policetest/alerts/{zone}", json.dumps({"alert_id": f"A{i}"}),
                    qos=1).wait_for_publish(5)
    pub.publish("policetest/stations/S1/reads", b"not an alert", qos=1).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()
    time.sleep(1.0)  # the broker has them (PUBACK); on loopback they reach police in ms
    arrived = police.arrived()
    assert set(arrived) == {"A0", "A1"}
    assert all(before <= t <= wall_ms() for t in arrived.values())


def test_the_webhook_receiver_notes_when_each_alert_arrived() -> None:
    import urllib.request

    webhook = _Receiver("webhook")
    before = wall_ms()
    for alert_id in ("A0", "A1", "A0"):  # a retry keeps the first arrival
        request = urllib.request.Request(
            f"http://127.0.0.1:{webhook.said[0]}/", data=b"{}", method="POST",
            headers={"webhook-id": alert_id, "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 204
    after = wall_ms()
    arrived = webhook.arrived()
    assert set(arrived) == {"A0", "A1"}
    assert before <= arrived["A0"] <= arrived["A1"] <= after
