"""Faults of the simulated world: client crashes, link outages, server worker failures."""

import numpy as np
import pytest
from doubles import FixedWorkload
from test_channels import _world

from fedsim.channels import UPLINK, SharedLink
from fedsim.clock import Clock
from fedsim.engine import Simulation
from fedsim.errors import FedsimError
from fedsim.ingress import Ingress as Server
from fedsim.ingress import ServerFailure


def _sim(sc, **kw):
    sim = Simulation(sc)
    sim.workload = FixedWorkload(sc, sim.fleet, **kw)
    return sim


def _events(sim):
    rows = [r.split(",", 5) for r in sim.rec.events_csv().splitlines()[1:]]
    return [(float(t), int(r), int(c), k, int(b), d) for t, r, c, k, b, d in rows]


LAPTOPS = [{"profile": "laptop", "count": 4, "overrides": {"mean_off_s": 0}}]


# --- link outage: closed form ----------------------------------------------------------------


def test_an_outage_stalls_a_flow_for_exactly_its_length(scenario_factory):
    rate, n = 8e6, 2_000_000  # 2 s alone
    sc = scenario_factory(network__cells=[{"uplink_rate_bps": rate}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    done = {}

    def flow():
        ok = yield link.transfer(0, n)
        done["t"], done["ok"] = env.now, ok

    def outage():
        yield env.timeout(0.5)
        link.set_outage(True)
        yield env.timeout(3.0)
        link.set_outage(False)

    env.process(flow())
    env.process(outage())
    env.run()
    assert done["ok"]
    assert done["t"] == pytest.approx(2.0 + 3.0, rel=1e-12)
    assert link.busy_s == pytest.approx(2.0, rel=1e-12)  # a stalled cell is not busy
    assert link.bits_carried == 8 * n


def test_a_flow_that_joins_during_an_outage_waits_for_its_end(scenario_factory):
    rate, n = 8e6, 1_000_000  # 1 s alone
    sc = scenario_factory(network__cells=[{"uplink_rate_bps": rate}])
    env, _, ch = _world(sc)
    link = SharedLink(env, ch, 0, UPLINK)
    link.set_outage(True)
    done = {}

    def flow():
        ok = yield link.transfer(0, n)
        done["t"] = env.now if ok else None

    def lift():
        yield env.timeout(4.0)
        link.set_outage(False)

    env.process(flow())
    env.process(lift())
    env.run()
    assert done["t"] == pytest.approx(5.0, rel=1e-12)


# --- server worker failure: closed form --------------------------------------------------------


@pytest.mark.parametrize("requeue", [True, False])
def test_a_failing_worker_preempts_the_update_it_serves(requeue):
    env = Clock()
    server = Server(env, workers=1, queue_capacity=10, requeue=requeue)
    log = []

    def update():
        try:
            wait = yield from server.serve(lambda: 10.0, lambda: log.append(("hit", env.now)))
            log.append(("served", env.now, wait))
        except ServerFailure:
            log.append(("lost", env.now))

    def failure():
        yield env.timeout(4.0)
        granted = server.fail_worker()
        yield granted
        log.append(("down", env.now))
        yield env.timeout(3.0)
        server.release(granted.hold)
        log.append(("up", env.now))

    env.process(update())
    env.process(failure())
    env.run()
    assert ("down", 4.0) in log and ("up", 7.0) in log and ("hit", 4.0) in log
    if requeue:  # queued again behind the repair, then a whole service: 7 + 10
        assert ("served", 17.0, 0.0) in log
        assert server.busy_s == pytest.approx(4.0 + 10.0)
    else:
        assert ("lost", 4.0) in log
        assert server.busy_s == pytest.approx(4.0)


# --- client crashes in the engine ----------------------------------------------------------------


def test_every_update_crashes_at_a_high_rate_and_the_rounds_go_on(scenario_factory):
    sc = scenario_factory(rounds=2, clients=LAPTOPS,
                          faults={"client_crash_per_h": 3600.0 * 100})  # mean 10 ms
    sim = _sim(sc, flops=3e12)  # 10 s of training: a crash first, almost surely
    s = sim.run().summary
    assert s["rounds_completed"] == 2
    assert s["overload"]["crashes"] == 8
    assert s["counts"]["updates_accepted"] == 0
    crashes = [e for e in _events(sim) if e[3] == "crash"]
    assert {e[5] for e in crashes} <= {"downlink", "train", "uplink"}


def test_a_crashed_client_reboots_and_tries_again(scenario_factory):
    restart_s = 5.0
    sc = scenario_factory(rounds=3, clients=LAPTOPS,
                          faults={"client_crash_per_h": 360.0, "on_crash": "retry",
                                  "crash_retries": 2, "restart_s": restart_s})
    sim = _sim(sc, flops=3e12)  # 10 s of training; mean time to crash 10 s
    s = sim.run().summary
    ev = _events(sim)
    crashes = [e for e in ev if e[3] == "crash"]
    assert crashes, "no crash at this rate: the test would prove nothing"
    for t, r, c, _, _, phase in crashes:
        later = [e for e in ev if e[2] == c and e[1] == r and e[0] >= t and e[3] != "crash"]
        tries = sum(1 for e in ev if e[2] == c and e[1] == r and e[3] == "crash")
        if phase != "restart" and tries <= 2:
            # The retry starts over with a download, restart_s after the crash.
            start = next(e for e in later if e[3] == "downlink_start")
            assert start[0] == pytest.approx(t + restart_s)
    per_update = {}
    for _, r, c, k, _, _ in ev:
        if k == "crash":
            per_update[(r, c)] = per_update.get((r, c), 0) + 1
    assert max(per_update.values()) <= 3  # the first try + crash_retries
    retried = s["counts"]["updates_accepted"]
    drop = _sim(scenario_factory(rounds=3, clients=LAPTOPS,
                                 faults={"client_crash_per_h": 360.0}), flops=3e12).run().summary
    assert retried > drop["counts"]["updates_accepted"]


def test_faults_are_events_and_counted_and_deterministic(scenario_factory):
    faults = {"client_crash_per_h": 20.0, "on_crash": "retry", "link_outage_per_h": 120.0,
              "link_outage_s": 5.0, "server_failure_per_h": 200.0, "server_repair_s": 4.0}
    kw = dict(rounds=6, clients=[{"profile": "mobile", "count": 8,
                                  "overrides": {"mean_off_s": 0}}],
              network__channel={"name": "static"}, faults=faults,
              server={"workers": 1, "flops_per_s": 1e9})
    runs = []
    for _ in range(2):
        sim = _sim(scenario_factory(**kw), flops=3e11, upload_bytes=5_000_000,
                   server_flops=5e9)  # 5 s of server work per update
        s = sim.run().summary
        runs.append((s, sim.rec.events_csv()))
    (s, events), (s2, events2) = runs
    assert events == events2
    s.pop("wall_time_s"), s2.pop("wall_time_s")
    assert s == s2
    ov = s["overload"]
    kinds = [line.split(",")[3] for line in events.splitlines()[1:]]
    assert ov["link_outages"] == kinds.count("link_down") > 0
    assert kinds.count("link_up") in (ov["link_outages"], ov["link_outages"] - 1)
    assert ov["server_failures"] == kinds.count("server_down") > 0
    assert ov["crashes"] == kinds.count("crash")
    assert ov["updates_hit_by_server_failures"] == kinds.count("server_failure")
    assert s["rounds_completed"] == 6 and s["counts"]["updates_accepted"] > 0


def test_fault_config_is_validated(scenario_factory):
    with pytest.raises(FedsimError, match=r"faults\.client_crash_per_h"):
        scenario_factory(faults={"client_crash_per_h": -1})
    with pytest.raises(FedsimError, match=r"faults\.on_crash"):
        scenario_factory(faults={"on_crash": "maybe"})
    with pytest.raises(FedsimError, match=r"faults\.server_repair_s"):
        scenario_factory(faults={"server_repair_s": 0})
    assert np.isfinite(scenario_factory().faults.link_outage_s)
