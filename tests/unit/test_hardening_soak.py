"""The pure parts of the soak (scripts/soak.py, `make soak`): the seeded load mix, reading
/metrics, the leak, status and RSS checks, and the table."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "soak", Path(__file__).resolve().parents[2] / "scripts" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak  # dataclasses look their module up there
_spec.loader.exec_module(soak)

IDLE = """# HELP alignserve:requests_in_flight Requests being served.
# TYPE alignserve:requests_in_flight gauge
alignserve:requests_in_flight 0.0
alignserve:engine_requests_unfinished 0.0
alignserve:admission_slots_held 0.0
alignserve:policy_leases_held 0.0
alignserve:policy_gate_queued 0.0
alignserve:requests_total{endpoint="chat",strategy="none"} 12.0
alignserve:requests_total{endpoint="completion",strategy="none"} 3.0
"""


def test_the_mix_is_seeded_weighted_and_covers_every_scenario():
    mix_a, mix_b, other = soak.Mix(soak.MIX, 7), soak.Mix(soak.MIX, 7), soak.Mix(soak.MIX, 8)
    a = [mix_a.next() for _ in range(2000)]
    b = [mix_b.next() for _ in range(2000)]
    assert a == b and set(a) == set(soak.MIX)
    assert [other.next() for _ in range(2000)] != a
    counts = Counter(a)
    assert counts["chat"] > counts["bad_json"]  # weight 4 against 1
    assert soak.Mix({"only": 1, "never": 0}, 0).next() == "only"
    with pytest.raises(ValueError):
        soak.Mix({"a": 0}, 0)


def test_every_scenario_has_a_handler():
    assert all(hasattr(soak.Load, f"_{name}") for name in soak.MIX)


def test_parse_metrics_sums_labels_and_skips_comments():
    m = soak.parse_metrics(IDLE)
    assert m["alignserve:requests_total"] == 15.0
    assert m["alignserve:requests_in_flight"] == 0.0
    assert not any(k.startswith("#") for k in m)


def test_an_idle_server_passes_the_leak_check():
    assert soak.leak_failures(soak.parse_metrics(IDLE)) == []


@pytest.mark.parametrize("line, gauge", [
    ("alignserve:requests_in_flight 0.0", "alignserve:requests_in_flight 1.0"),
    ("alignserve:admission_slots_held 0.0", "alignserve:admission_slots_held 3.0"),
    ("alignserve:policy_leases_held 0.0", "alignserve:policy_leases_held 2.0"),
    ("alignserve:engine_requests_unfinished 0.0", "alignserve:engine_requests_unfinished 4.0"),
])
def test_a_leaked_slot_lease_or_engine_request_fails(line, gauge):
    failures = soak.leak_failures(soak.parse_metrics(IDLE.replace(line, gauge)))
    assert len(failures) == 1 and gauge.split()[0] in failures[0] and "leak" in failures[0]


def test_missing_required_gauges_fail_but_optional_ones_do_not():
    no_leases = IDLE.replace("alignserve:policy_leases_held 0.0\n", "")
    assert soak.leak_failures(soak.parse_metrics(no_leases)) == []
    no_engine = IDLE.replace("alignserve:engine_requests_unfinished 0.0\n", "")
    assert soak.leak_failures(soak.parse_metrics(no_engine)) == [
        "alignserve:engine_requests_unfinished missing from /metrics"]


def test_status_checks_allow_designed_5xx_and_busy_but_not_500s_or_wrong_4xx():
    ok = {"chat": Counter({200: 5, 429: 2, 503: 1, 504: 1}), "bad_json": Counter({400: 3}),
          "over_limit": Counter({413: 2, 429: 1}), "stream_disconnect": Counter({"dropped": 4})}
    assert soak.status_failures(ok) == []
    bad = {"chat": Counter({500: 1}), "over_limit_chunked": Counter({400: 2})}
    failures = soak.status_failures(bad)
    assert any("HTTP 500" in f for f in failures)
    assert any("over_limit_chunked" in f and "413" in f for f in failures)


def test_rss_growth_bound():
    mib = 1 << 20
    assert soak.rss_growth_failure(1000 * mib, 1099 * mib, 0.10) is None
    assert "10.0%" in soak.rss_growth_failure(1000 * mib, 1100 * mib, 0.10)
    assert soak.rss_growth_failure(0, 5, 0.1) == "no RSS baseline"


def test_the_table_lists_scenarios_outcomes_and_checks():
    text = soak.table({"chat": Counter({200: 3, 429: 1}),
                       "stream_disconnect": Counter({"dropped": 2})},
                      [("requests_in_flight", "0"), ("result", "PASS")])
    lines = text.splitlines()
    assert lines[0].split() == ["scenario", "200", "429", "dropped", "total"]
    assert lines[2].split() == ["chat", "3", "1", "0", "4"]
    assert lines[3].split() == ["stream_disconnect", "0", "0", "2", "2"]
    assert lines[-1].split() == ["result", "PASS"]
