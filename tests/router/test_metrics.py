"""`/metrics` and what reads it: the Grafana dashboard names only metrics the router exports,
and the router's log lines about a request carry its id."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pdserve.router.logs import REQUEST_ID, install

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "pdserve.json"


def test_the_dashboard_reads_only_exported_metrics(start_router):
    running = start_router(http_listen="127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{running.router.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        running.stop()
    exported = {family.name for family in text_string_to_metric_families(text)}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    used = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"pdserve_[a-z0-9_]+", expr)
    }
    assert len(used) > 20
    assert used <= exported, used - exported


def test_log_lines_about_a_request_carry_its_id_in_tasks_it_starts():
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    install(handler, "%(name)s: %(message)s")
    log = logging.getLogger("pdserve.router.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def started() -> None:
        log.info("from a task it started")

    async def request() -> None:
        REQUEST_ID.set("req-42")
        log.info("placed")
        await asyncio.create_task(started())

    try:
        asyncio.run(request())
        log.info("not about a request")
    finally:
        log.removeHandler(handler)
    assert lines == [
        "pdserve.router.test: placed request_id=req-42",
        "pdserve.router.test: from a task it started request_id=req-42",
        "pdserve.router.test: not about a request",
    ]
