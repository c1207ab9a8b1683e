"""deploy/prometheus: promtool accepts the scrape config and the rules, the rules' unit tests pass and
cover every alert, and a real Prometheus scrapes the real daemons with that config and those rules."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from deploy_support import (
    BIN,
    PROMETHEUS_DIR,
    Prometheus,
    alert_cases,
    alert_names,
    ctl,
    daemons,
    free_port,
    metric_names_in,
    need,
    parse_metrics,
    qemu_write,
    run,
    scrape,
    series_key,
    wait_in_sync,
)

CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = PROMETHEUS_DIR.parent / "grafana" / "standby-appliance.json"
RULE_TESTS = PROMETHEUS_DIR / "alerts_test.yml"

# What the issue asks to alert on: each must be the subject of one alert.
REQUIRED = {
    "standby_preservation_fill_ratio",
    "standby_snapshot_valid",
    "standby_replication_connected",
    "standby_out_of_sync_bytes",
    "standby_backup_last_success_timestamp_seconds",
}


def test_promtool_check_config() -> None:
    out = run(need("promtool"), "check", "config", CONFIG).stdout
    assert "SUCCESS" in out and "1 rule files found" in out, out


def test_promtool_check_rules() -> None:
    out = run(need("promtool"), "check", "rules", RULES).stdout
    names = alert_names(RULES.read_text())
    assert f"SUCCESS: {len(names)} rules found" in out, (out, names)
    assert len(set(names)) == len(names), f"duplicate alert names: {names}"
    assert metric_names_in(RULES.read_text()) >= REQUIRED, metric_names_in(RULES.read_text())


def test_promtool_test_rules_cover_every_alert() -> None:
    out = run(need("promtool"), "test", "rules", RULE_TESTS).stdout
    assert "SUCCESS" in out, out
    cases = alert_cases(RULE_TESTS.read_text())
    for name in alert_names(RULES.read_text()):
        kinds = {fires for alert, fires in cases if alert == name}
        assert kinds == {True, False}, f"{name}: needs a firing and a not-firing case in {RULE_TESTS.name}"
    unknown = {alert for alert, _ in cases} - set(alert_names(RULES.read_text()))
    assert not unknown, f"tests of alerts that do not exist: {unknown}"


def test_rules_every_alert_has_severity_and_guidance() -> None:
    text = RULES.read_text()
    blocks = text.split("- alert: ")[1:]
    assert len(blocks) == len(alert_names(text))
    for block in blocks:
        name = block.split()[0]
        assert "severity: warning" in block or "severity: critical" in block, name
        assert "summary:" in block and "description:" in block, name
        assert "standbyctl" in block or "systemctl" in block or "journalctl" in block, (
            f"{name}: the description must say which command to run"
        )


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel of deploy/grafana/standby-appliance.json, and of its variables."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"].removeprefix("label_values(").split(",")[0] for v in board["templating"]["list"]
              if v.get("definition")]  # fmt: skip
    return exprs


def _config_for(tmp: Path, standby: str, primary: str, backup: str) -> Path:
    """deploy/prometheus/prometheus.yml with the daemons' real addresses and a 1 s scrape interval."""
    text = CONFIG.read_text()
    for default, real in (
        ("127.0.0.1:9700", standby),
        ("127.0.0.1:9701", primary),
        ("127.0.0.1:9702", backup),
    ):
        assert f'"{default}"' in text, f"{CONFIG} has no target {default}"
        text = text.replace(f'"{default}"', f'"{real}"')
    for key in ("scrape_interval", "evaluation_interval"):
        assert f"{key}: 15s" in text
        text = text.replace(f"{key}: 15s", f"{key}: 1s")
    config = tmp / "prometheus.yml"
    config.write_text(text)
    shutil.copy(RULES, tmp / "alerts.yml")
    run(need("promtool"), "check", "config", config)
    return config


def _by_series(result: list[dict[str, object]], job: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A query's samples of `job`, keyed by their labels without job and instance."""
    out = {}
    for r in result:
        metric = dict(r["metric"])  # type: ignore[call-overload]
        if metric.pop("job") != job:
            continue
        metric.pop("instance")
        metric.pop("__name__", None)
        out[series_key(metric)] = float(r["value"][1])  # type: ignore[index]
    return out


def _exposed(address: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {series_key(labels): v for labels, v in scrape(address).get(name, [])}


def test_real_prometheus_scrapes_the_daemons(tmp_path: Path) -> None:
    need("prometheus")
    with daemons(tmp_path) as ds:
        standby = ds.standby(tmp_path / "standby", "--preservation-capacity", "64MiB")
        grpc = standby.addresses["grpc"]
        primary = ds.primary([f"vol0={tmp_path / 'vol0.img'},size=16MiB"], grpc)
        wait_in_sync(primary.addresses["metrics"], "vol0")
        # a snapshot with preserved blocks: a fill ratio that is not 0
        qemu_write(primary.addresses["nbd"], "vol0", "write -P 0x11 0 4M")
        ctl(grpc, "snapshot", "create", "vol0", "s1")
        qemu_write(primary.addresses["nbd"], "vol0", "write -P 0x22 0 1M")
        wait_in_sync(primary.addresses["metrics"], "vol0")

        # the backup's metrics, as the textfile collector would expose them
        prom_file = tmp_path / "standby_backup_vol0.prom"
        run(
            BIN / "standby-backup", "run", "vol0", "--standby", grpc, "--output", tmp_path / "vol0.tar.zst",
            "--metrics-listen", "off", "--metrics-textfile", prom_file, "--log-format", "json",
        )  # fmt: skip
        backup_metrics = parse_metrics(prom_file.read_text())
        [(labels, last_success)] = backup_metrics["standby_backup_last_success_timestamp_seconds"]
        assert labels == {"volume": "vol0", "kind": "full"} and last_success > 0
        assert backup_metrics["standby_backup_running"] == [({"volume": "vol0"}, 0.0)]

        # every metric the alert rules use is one the roles expose, with the labels the rules match on
        exposed = {
            name
            for m in (
                scrape(standby.addresses["metrics"]),
                scrape(primary.addresses["metrics"]),
                backup_metrics,
            )
            for name in m
        }
        missing = metric_names_in(RULES.read_text()) - exposed
        assert not missing, f"the alert rules use metrics no role exposes: {missing}"
        # and every metric the Grafana dashboard shows
        used = {m for e in dashboard_exprs() for m in re.findall(r"\bstandby_[a-z0-9_]+", e)}
        assert len(used) >= 15, used
        assert not used - exposed, f"the dashboard uses metrics no role exposes: {used - exposed}"

        backup_port = f"127.0.0.1:{free_port()}"
        config = _config_for(
            tmp_path, standby.addresses["metrics"], primary.addresses["metrics"], backup_port
        )
        prom = Prometheus(config, tmp_path / "prometheus")
        try:
            # every daemon target up; the backup node's down between runs, as documented
            def targets() -> dict[str, str] | None:
                active = prom.api("targets")["activeTargets"]
                health = {t["labels"]["job"]: t["health"] for t in active}
                ok = health.get("standby-daemon") == "up" and health.get("standby-primary") == "up"
                return health if ok and health.get("standby-backup") == "down" else None

            health = prom.wait(targets, "scraping both daemons")
            assert set(health) == {"standby-daemon", "standby-primary", "standby-backup"}, health

            # what Prometheus stored = what the daemons serve
            for name, job, address in (
                ("standby_preservation_fill_ratio", "standby-daemon", standby.addresses["metrics"]),
                ("standby_replication_connected", "standby-daemon", standby.addresses["metrics"]),
                ("standby_replication_connected", "standby-primary", primary.addresses["metrics"]),
            ):
                want = _exposed(address, name)
                got = prom.wait(
                    lambda name=name, job=job, want=want: (
                        _by_series(prom.query(name), job) == want and _by_series(prom.query(name), job)
                    ),
                    f"reporting {name} of {job} as the daemon does ({want})",
                )
                assert got == want
            fill = _exposed(standby.addresses["metrics"], "standby_preservation_fill_ratio")
            s1 = fill[series_key({"volume": "vol0", "snapshot": "s1"})]
            assert math.isclose(s1, (1 << 20) / (64 << 20)), fill  # 1 MiB preserved of 64 MiB
            assert fill[()] == s1, fill  # the store: the one snapshot's blocks
            assert _exposed(primary.addresses["metrics"], "standby_replication_connected") == {
                series_key({"volume": "vol0"}): 1.0
            }

            # the rules load and evaluate on the real series
            names = alert_names(RULES.read_text())

            def rules() -> dict[str, str] | None:
                found = {
                    r["name"]: r["health"]
                    for g in prom.api("rules", type="alert")["groups"]
                    for r in g["rules"]
                    if r["type"] == "alerting"
                }
                return found if set(found) == set(names) and set(found.values()) == {"ok"} else None

            assert prom.wait(rules, f"evaluating the alert rules {names}")
            # every query of the dashboard is valid PromQL that Prometheus evaluates
            for expr in dashboard_exprs():
                prom.query(expr.replace("$volume", ".*"))
            volumes = prom.wait(
                lambda: prom.api("label/volume/values") or None, "the volumes of the dashboard's variable"
            )
            assert "vol0" in volumes, volumes
            assert prom.api("alerts")["alerts"] == [], "no alert may be pending on a healthy appliance"

            # the standby goes away: the primary's disconnection and the standby's target-down alerts
            # match the real series (pending: both wait a minute or two before firing)
            ds.stop(standby)

            def pending() -> set[tuple[str, str]] | None:
                alerts = {(a["labels"]["alertname"], a["state"]) for a in prom.api("alerts")["alerts"]}
                want = {("StandbyReplicationDisconnected", "pending"), ("StandbyTargetDown", "pending")}
                return alerts if want <= alerts else None

            alerts = prom.wait(pending, "pending StandbyReplicationDisconnected and StandbyTargetDown")
            [disconnected] = [
                a
                for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "StandbyReplicationDisconnected"
            ]
            assert disconnected["labels"]["job"] == "standby-primary", disconnected
            assert disconnected["labels"]["volume"] == "vol0", disconnected
            assert {a for a, _ in alerts} <= {
                "StandbyReplicationDisconnected",
                "StandbyTargetDown",
                "StandbyOutOfSyncGrowing",
            }, alerts
        finally:
            rc = prom.stop()
        assert rc == 0, f"prometheus exited with {rc}:\n{prom.tail()}"
