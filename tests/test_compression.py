"""Compression in simulation: the real workload's encoded payloads cross the simulated channel.

Tiny models (tiny-bert, a 17.7 kB rank-8 q/v adapter) and a ``static`` channel whose uplink rate
is set per cell, so every byte count and every codec choice below follows from the rate, the
deadline and the payload size formulas of ``fedsim.codecs``. Unit tests of the codecs
themselves (sizes, round trips, corruption) are in ``test_codecs.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from fedsim import codecs
from fedsim.devices import build_fleet
from fedsim.engine import Simulation
from fedsim.federation import LoraWorkload
from fedsim.metrics import write_run_dir
from fedsim.rng import stream
from fedsim.scenario import validate
from fedsim.workload import Upload

ENCODE_DETAIL = re.compile(r"^(?P<codec>\S+) raw=(?P<raw>\d+) err=(?P<err>\S+)$")
LADDER = [s.describe() for s in codecs.default_ladder()]  # least to most lossy
DEADLINE_S = 2.0


def scenario(rates_bps=(1e6,), per_cell=1, codec="adaptive", deadline_s=DEADLINE_S, rounds=1,
             seed=3, estimate="exact", error_db=2.0):
    """``per_cell`` always-on phones in each cell of a ``static`` channel (one cell per rate),
    tiny-bert on 200 BBC articles; ``deadline`` rounds when ``deadline_s`` is set, else sync.
    The adaptive codec knows the uplink ``estimate``-ly (exact by default here: the tests of
    the fitting rule need the rate it is given to be the rate it gets)."""
    policy = ({"name": "deadline", "deadline_s": deadline_s} if deadline_s
              else {"name": "sync"})
    return validate({
        "name": "tiny-compression", "seed": seed, "rounds": rounds,
        "workload": {"name": "real"},
        "clients": [{"profile": "mobile", "count": per_cell * len(rates_bps), "model": "tiny-bert",
                     "overrides": {"mean_off_s": 0}}],
        "network": {"channel": {"name": "static"},
                    "cells": [{"uplink_rate_bps": r} for r in rates_bps]},
        "task": {"dataset": "bbc-news", "kind": "classification", "max_train_examples": 200,
                 "eval_examples": 20, "partition": {"name": "iid"}},
        "training": {"local_steps": 2, "batch_size": 8, "max_length": 32, "lr": 5e-3},
        "compression": {"codec": codec, **({"safety_margin": 0.8, "estimate": estimate,
                                            "estimate_error_db": error_db}
                                           if codec == "adaptive" else {})},
        "round_policy": policy,
    })


def events(result):
    """The run's events as dicts, exactly as events.csv holds them."""
    return list(csv.DictReader(io.StringIO(result.recorder.events_csv())))


def encodes(evs):
    """(round, client) -> (payload bytes, codec setting, raw bytes, relative error)."""
    out = {}
    for e in evs:
        if e["kind"] == "encode":
            m = ENCODE_DETAIL.match(e["detail"])
            assert m, f"encode detail not '<codec> raw=<n> err=<x>': {e['detail']!r}"
            out[(int(e["round"]), int(e["client"]))] = (
                int(e["bytes"]), m["codec"], int(m["raw"]), float(m["err"]))
    return out


def accepted(evs):
    return {(int(e["round"]), int(e["client"])) for e in evs if e["kind"] == "ingest_end"}


# --- the policy follows the channel -----------------------------------------------------------


def test_adaptive_compresses_more_as_the_uplink_worsens():
    """Same clients, same seed, the uplink rate of every cell divided step by step: the mean
    payload never grows and the settings chosen move down the ladder (more lossy)."""
    sizes, ranks, chosen = [], [], []
    for rate in (2e6, 6e4, 2e4, 2e3):  # 2 phones share each of the 2 cells
        res = Simulation(scenario((rate, rate), per_cell=2)).run()
        enc = encodes(events(res))
        assert len(enc) == 4
        sizes.append(np.mean([b for b, *_ in enc.values()]))
        ranks.append(np.mean([LADDER.index(c) for _, c, _, _ in enc.values()]))
        chosen.append(sorted({c for _, c, _, _ in enc.values()}))
    assert all(a >= b for a, b in itertools.pairwise(sizes)), (sizes, chosen)
    assert all(a <= b for a, b in itertools.pairwise(ranks)), (ranks, chosen)
    assert sizes[0] > 5 * sizes[-1] and ranks[0] < ranks[-1], (sizes, chosen)
    assert chosen[0] == ["none"]  # a fast uplink: no reason to lose anything
    assert all(c.startswith("topk") for c in chosen[-1])  # 2 kbit/s: only top-k fits


def test_adaptive_meets_deadlines_that_none_misses():
    """One phone per cell at 50 kbit/s, a 2 s deadline: a 17.7 kB fp32 update needs ~2.9 s and
    misses; adaptive sizes each payload to 0.8 of the time left and every update arrives."""
    rates = (5e4, 5e4, 5e4)
    s_none = Simulation(scenario(rates, codec="none", rounds=2)).run().summary
    s_adapt = Simulation(scenario(rates, codec="adaptive", rounds=2)).run().summary
    assert s_none["overload"]["deadline_misses"] == 6
    assert s_none["counts"]["updates_accepted"] == 0
    assert s_adapt["overload"]["deadline_misses"] == 0
    assert s_adapt["counts"]["updates_accepted"] == 6
    assert s_adapt["latency_s"]["upload"]["max"] <= 0.8 * DEADLINE_S
    # Rounds close as soon as every update is in, not at the deadline.
    assert s_adapt["sim_time_s"] < s_none["sim_time_s"] == pytest.approx(2 * DEADLINE_S)


def test_realistic_channel_knowledge_costs_deadlines_that_the_exact_estimate_meets():
    """The same phones choosing from the rate they estimate: exact (an oracle) meets every
    deadline; realistic (a 2 dB log-normal error, fedsim.estimation) overestimates some
    uplinks, picks payloads that do not fit, and misses; with a 0 dB error on a static
    channel (whose previous block is the current one) it is the exact run, event for event."""
    rates = (5e4, 5e4, 5e4)
    exact = Simulation(scenario(rates, rounds=2)).run()
    realistic = Simulation(scenario(rates, rounds=2, estimate="realistic")).run()
    assert exact.summary["overload"]["deadline_misses"] == 0
    assert realistic.summary["overload"]["deadline_misses"] > 0
    chosen = [{k: v[0] for k, v in encodes(events(r)).items()} for r in (exact, realistic)]
    assert chosen[0] != chosen[1]  # other payload sizes for the same updates
    errorless = Simulation(scenario(rates, rounds=2, estimate="realistic", error_db=0.0)).run()
    assert errorless.recorder.events_csv() == exact.recorder.events_csv()


def test_adaptive_on_a_shared_cell_meets_deadlines_that_none_misses():
    """Four phones on one 100 kbit/s cell: none misses every deadline; adaptive misses none,
    because each client's rate estimate counts the cell's flows still to come this round, not
    only those active when it finishes training."""
    s_none = Simulation(scenario((1e5,), per_cell=4, codec="none")).run().summary
    s_adapt = Simulation(scenario((1e5,), per_cell=4, codec="adaptive")).run().summary
    assert s_none["overload"]["deadline_misses"] == 4
    assert s_adapt["overload"]["deadline_misses"] == 0
    assert s_adapt["counts"]["updates_accepted"] == 4


# --- corrupt payloads are rejected at ingest and leave the server state alone -----------------


def flip_byte(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


TAMPER = {
    "flip-body": lambda d: flip_byte(d, len(d) // 2),
    "flip-header": lambda d: flip_byte(d, 12),
    "flip-crc": lambda d: flip_byte(d, len(d) - 1),
    "truncate": lambda d: d[: len(d) - 7],
    "truncate-to-header": lambda d: d[:10],
    "extend": lambda d: d + b"\x00",
    "empty": lambda d: b"",
}


def tampered(upload: Upload, how) -> Upload:
    sent = upload.sent
    bad = dataclasses.replace(sent, payload=codecs.Payload(how(sent.payload.data)))
    return dataclasses.replace(upload, sent=bad)


@pytest.fixture(scope="module")
def workload_and_upload():
    """A real workload of 2 tiny-bert clients and client 0's genuine round-0 upload (qsgd-8)."""
    sc = scenario((1e6, 1e6), codec="qsgd")
    wl = LoraWorkload(sc, build_fleet(sc, stream(sc.seed, "fleet")))
    wl.download_bytes(0)
    update = wl.train(0, 0, wl.plan(0, 0))
    return wl, wl.encode(0, 0, update, rate_bps=1e6, time_left_s=None)


def family_state(wl):
    return {m: {k: t.clone() for k, t in fam.adapter.items()} for m, fam in wl.families.items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(
        a[m].keys() == b[m].keys() and all(torch.equal(a[m][k], b[m][k]) for k in a[m])
        for m in a)


@pytest.mark.parametrize("how", TAMPER)
def test_tampered_payload_is_rejected_and_the_family_adapter_is_unchanged(
        workload_and_upload, how):
    wl, upload = workload_and_upload
    before = family_state(wl)
    ing = wl.ingest(0, tampered(upload, TAMPER[how]))
    assert ing.accepted is False and ing.result is None and not ing.carried
    assert ing.detail.startswith("corrupt payload:")
    assert wl.aggregate(0, []) == 0.0  # a round with no accepted arrival
    assert same_state(before, family_state(wl))


def test_the_genuine_upload_is_accepted_and_moves_the_adapter(workload_and_upload):
    """The control for the test above: the untampered payload does change the family state."""
    from fedsim.workload import Arrival

    wl, upload = workload_and_upload
    ing = wl.ingest(0, upload)
    assert ing.accepted and ing.flops > 0
    before = family_state(wl)
    wl.aggregate(0, [Arrival(client=0, round=0, num_samples=16, result=ing.result,
                             carried=ing.carried)])
    assert not same_state(before, family_state(wl))


def test_non_finite_delta_is_quarantined(workload_and_upload):
    wl, upload = workload_and_upload
    delta = codecs.decode(upload.sent.payload)
    name = next(iter(delta))
    delta[name].view(-1)[0] = math.nan
    bad = dataclasses.replace(upload.sent, payload=codecs.CODECS.get("none")().encode(delta))
    ing = wl.ingest(0, dataclasses.replace(upload, sent=bad))
    assert not ing.accepted and "non-finite" in ing.detail


class CorruptingWorkload(LoraWorkload):
    """The real workload, but every ``k``-th upload has one payload byte flipped on the wire
    (after encoding, so the sender's size and codec are the genuine ones)."""

    def __init__(self, scenario, fleet, k):
        super().__init__(scenario, fleet)
        self.k, self.calls, self.corrupted = k, 0, set()

    def encode(self, client, round_, update, rate_bps, time_left_s):
        upload = super().encode(client, round_, update, rate_bps, time_left_s)
        self.calls += 1
        if self.calls % self.k == 0:
            self.corrupted.add((round_, client))
            return tampered(upload, lambda d: flip_byte(d, len(d) // 3))
        return upload


def test_engine_rejects_corrupt_uploads_and_counts_them():
    sc = scenario((1e6,), per_cell=4, codec="adaptive", deadline_s=None, rounds=2)
    wl = CorruptingWorkload(sc, build_fleet(sc, stream(sc.seed, "fleet")), k=3)
    res = Simulation(sc, workload=wl).run()
    s, evs = res.summary, events(res)
    assert len(wl.corrupted) == 2  # 8 uploads, every third corrupted
    assert s["overload"]["rejected_updates"] == 2
    rejected = {(int(e["round"]), int(e["client"])): e["detail"]
                for e in evs if e["kind"] == "rejected"}
    assert set(rejected) == wl.corrupted
    assert all("CRC32 mismatch" in d for d in rejected.values())
    assert s["counts"]["updates_accepted"] == 6
    assert accepted(evs).isdisjoint(wl.corrupted)
    aggregated = [int(e["detail"].split("=")[1]) for e in evs if e["kind"] == "aggregate"]
    assert sum(aggregated) == 6
    assert s["comm"]["bytes_up_accepted"] == sum(b for key, (b, *_) in encodes(evs).items()
                                                 if key in accepted(evs))
    # bytes_up: every payload that crossed the uplink, the 2 rejected ones included
    assert s["comm"]["bytes_up"] == sum(b for b, *_ in encodes(evs).values())
    assert s["comm"]["bytes_up"] > s["comm"]["bytes_up_accepted"]


# --- what the run directory says about compression ---------------------------------------------


def check_ratio_over_accepted(summary, evs):
    enc, ok = encodes(evs), accepted(evs)
    raw = sum(enc[k][2] for k in ok)
    sent = sum(enc[k][0] for k in ok)
    assert summary["comm"]["bytes_up_accepted"] == sent
    assert summary["comm"]["compression_ratio"] == pytest.approx(raw / sent, rel=1e-12)


def test_run_dir_reports_per_update_compression_and_the_ratio(tmp_path):
    """events.csv ``encode`` rows: payload bytes, then ``<codec> raw=<n> err=<x>``; summary.json
    ``comm.compression_ratio`` = raw / encoded bytes summed over the accepted updates."""
    # 4 phones, 2 per cell, cells of 20 and 100 kbit/s: the settings chosen differ.
    sim = Simulation(scenario((2e4, 1e5), per_cell=2, rounds=2, deadline_s=3.0))
    res = sim.run()
    out = write_run_dir(res, tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader((out / "events.csv").open()))
    enc = encodes(rows)
    assert len(enc) == 8
    raw_fp32 = codecs.raw_bytes(sim.workload.families["tiny-bert"].adapter)
    for nbytes, codec, raw, err in enc.values():
        assert codec in LADDER
        assert raw == raw_fp32
        assert math.isfinite(err) and err >= 0
        assert (err == 0) == (codec == "none")
        if codec == "fp16":
            assert err < 1e-3
        assert 0 < nbytes <= raw + 2000  # a payload is never much above fp32 (framing only)
    assert len({c for _, c, _, _ in enc.values()}) >= 2
    assert summary["overload"]["deadline_misses"] == 0
    check_ratio_over_accepted(summary, rows)
    assert summary["comm"]["compression_ratio"] > 2


def test_compression_ratio_counts_only_accepted_updates_when_some_fail():
    res = Simulation(scenario((5e4, 1e6), codec="none")).run()  # the 50 kbit/s phone misses
    assert res.summary["overload"]["deadline_misses"] == 1
    check_ratio_over_accepted(res.summary, events(res))
