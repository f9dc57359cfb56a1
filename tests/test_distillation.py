"""Distillation as a transfer: teacher aggregation by hand, selective transfer, the KL the
server's distillation lowers, the adaptive k against the channel, and tiny runs end to end."""

import csv
import io
import math

import numpy as np
import pytest
import torch

from fedsim import codecs
from fedsim import logits as topk
from fedsim.cli import main
from fedsim.data import Example
from fedsim.distillation import (
    ProxySet,
    Teacher,
    aggregate_teachers,
    distil,
    kl_on_support,
    model_logits,
    proxy_set,
    select_teachers,
    target_ids,
)
from fedsim.engine import Simulation
from fedsim.errors import FedsimError
from fedsim.metrics import write_run_dir
from fedsim.plugins import DistillationTransferConfig, ProxyConfig, TopKLogitsConfig
from fedsim.scenario import validate
from fedsim.server import ServerModel


def T(ids, probs):
    return Teacher(torch.tensor(ids), torch.tensor(probs, dtype=torch.float64))


def entries(t):
    """A teacher's (position, id) -> probability, padding left out."""
    return {(p, int(i)): float(q) for p, (ids, probs) in enumerate(zip(t.ids, t.probs,
                                                                      strict=True))
            for i, q in zip(ids, probs, strict=True) if i >= 0}


# --- aggregation by hand ---------------------------------------------------------------------


def test_adaptive_aggregation_is_the_weighted_mean_over_the_clients_that_sent_each_token():
    # Position 0: both send {1, 3}. Position 1: client a sends {0, 2}, client b {2, 4}.
    a = T([[1, 3], [0, 2]], [[0.6, 0.4], [0.7, 0.3]])
    b = T([[1, 3], [2, 4]], [[0.2, 0.8], [0.5, 0.5]])
    wa, wb = 3.0, 1.0
    ad = aggregate_teachers([a, b], [wa, wb], "adaptive")
    zp = aggregate_teachers([a, b], [wa, wb], "zero-pad")
    rows = entries(ad)
    assert rows == pytest.approx({
        (0, 1): (wa * 0.6 + wb * 0.2) / 4, (0, 3): (wa * 0.4 + wb * 0.8) / 4,
        (1, 0): 0.7,  # only a sent it: a's probability, not diluted
        (1, 2): (wa * 0.3 + wb * 0.5) / 4,
        (1, 4): 0.5})  # only b
    zrows = entries(zp)
    assert zrows[(1, 0)] == pytest.approx(wa * 0.7 / 4)
    assert zrows[(1, 4)] == pytest.approx(wb * 0.5 / 4)
    # They differ exactly where the supports differ: tokens 0 and 4 of position 1.
    differ = {k for k in rows if not math.isclose(rows[k], zrows[k])}
    assert differ == {(1, 0), (1, 4)}
    # Normalized, the rows are distributions; the shared position 0 is the same under both.
    n_ad, n_zp = ad.normalized(), zp.normalized()
    assert torch.allclose(n_ad.probs.sum(1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(n_ad.probs[0], n_zp.probs[0])
    assert not torch.allclose(n_ad.probs[1], n_zp.probs[1])


def test_aggregation_rejects_mismatched_inputs():
    a = T([[1]], [[1.0]])
    with pytest.raises(FedsimError):
        aggregate_teachers([a], [1.0, 2.0])
    with pytest.raises(FedsimError):
        aggregate_teachers([a, T([[1], [2]], [[1.0], [1.0]])], [1.0, 1.0])
    with pytest.raises(FedsimError):
        aggregate_teachers([a], [1.0], "median")


def test_selective_transfer_takes_the_teacher_that_scores_each_reference_best():
    # Two examples of one position each; references 0 and 1.
    a = T([[0, 1], [0, 1]], [[0.9, 0.1], [0.9, 0.1]])
    b = T([[0, 1], [0, 1]], [[0.4, 0.6], [0.2, 0.8]])
    chosen = select_teachers([a, b], [1, 1], torch.tensor([0, 1]))
    assert torch.equal(chosen.probs[0], a.probs[0]) and torch.equal(chosen.probs[1], b.probs[1])
    # Without references: the lowest entropy (a is the surer one on both).
    sure = select_teachers([a, b], [1, 1], None)
    assert torch.equal(sure.probs, a.probs)


def test_kl_on_support_is_zero_at_the_teacher_and_positive_elsewhere():
    teacher = T([[0, 2], [1, -1]], [[0.25, 0.75], [1.0, 0.0]])
    temperature = 2.0
    # A student whose softmax(z/T) restricted to {0, 2} is (0.25, 0.75): z = T·log p (+ any
    # value on token 1, outside the support).
    z = torch.tensor([[temperature * math.log(0.25), 5.0, temperature * math.log(0.75)],
                      [0.0, 3.0, -1.0]])
    assert float(kl_on_support(z, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_on_support(torch.zeros(2, 3), teacher, temperature)) > 0.01


# --- the proxy set ---------------------------------------------------------------------------


def test_proxy_set_is_held_out_after_the_evaluation_slice_and_batches_are_seeded():
    test = [Example(f"t{i}", label=i % 2) for i in range(30)]
    proxy = proxy_set(test, 10, ProxyConfig(size=12, batch=5), seed=4)
    assert [e.text for e in proxy.examples] == [f"t{i}" for i in range(10, 22)]
    assert proxy.batch(1) == proxy_set(test, 10, ProxyConfig(size=12, batch=5), 4).batch(1)
    assert len(set(proxy.batch(1))) == 5 and proxy.batch(1) != proxy.batch(2)
    assert proxy.nbytes == sum(len(e.text) for e in proxy.examples)
    with pytest.raises(FedsimError, match="none left for the proxy set"):
        proxy_set(test, 30, ProxyConfig(), seed=0)
    assert ProxySet(tuple(test[:3]), 8, 0).batch(0) == (0, 1, 2)  # a batch of all there is


# --- the adaptive k --------------------------------------------------------------------------


def test_adaptive_k_and_upload_shrink_with_the_channel_monotonically():
    cfg = TopKLogitsConfig(adaptive=True, k_min=4, k_max=512)
    positions, vocab = 64, 49152
    ks, sizes = [], []
    for rate in (1e8, 3e7, 1e7, 3e6, 1e6, 3e5, 1e5, 1e4):
        k = cfg.k_for(rate, 0.5, positions, vocab)
        ks.append(k)
        sizes.append(topk.size_bytes(positions, k, vocab))
        assert k == cfg.k_for(rate, 0.5, positions, vocab)  # a function of its inputs
    assert ks == sorted(ks, reverse=True) and ks[0] == 512 and ks[-1] == 4
    assert sizes == sorted(sizes, reverse=True)
    # No deadline: the budget is time_budget_s, or no limit at all.
    assert cfg.k_for(1e5, None, positions, vocab) == 512
    budgeted = cfg.model_copy(update={"time_budget_s": 0.5})
    assert budgeted.k_for(1e6, None, positions, vocab) == cfg.k_for(1e6, 0.5, positions, vocab)


# --- the server's distillation (tiny models) -------------------------------------------------


def _server(task="classification", model="tiny-mpnet", labels=5):
    return ServerModel(model, task, labels, seed=0, lora_r=4, lora_alpha=8,
                       target_roles=("q", "v"), max_length=32, batch_size=8, zero_head=True)


def test_distillation_lowers_the_kl_to_the_teacher_and_folds_into_the_weights():
    server = _server()
    examples = [Example(f"news story number {i} about markets and sport", label=i % 5)
                for i in range(8)]
    # One learnable target (a tiny random model barely tells these texts apart): on labels
    # {0, 2, 3}, mass 0.7 / 0.2 / 0.1 for every example.
    ids = np.tile([0, 2, 3], (8, 1))
    probs = np.tile([0.7, 0.2, 0.1], (8, 1))
    teacher = Teacher(torch.from_numpy(ids), torch.from_numpy(probs))
    cfg = DistillationTransferConfig(server_steps=10, server_lr=5e-3, temperature=2.0)

    def kl():
        server.trainer.apply(server.adapter)
        with torch.no_grad():
            z, lengths = model_logits(server.trainer, examples)
        assert lengths == [1] * 8
        return float(kl_on_support(z, teacher, cfg.temperature))

    before, weights_before = kl(), {k: v.clone() for k, v in server.weights().items()}
    flops = distil(server, examples, teacher, cfg)
    after = kl()
    assert after < 0.8 * before
    assert flops > 0
    # Folded: the LoRA is back at its start, the change lives in the weights it merged.
    lora = {k: v for k, v in server.adapter.items() if ".lora_B." in k}
    assert lora and all(float(v.abs().max()) == 0 for v in lora.values())
    changed = {k for k, v in server.weights().items() if not torch.equal(v, weights_before[k])}
    assert changed and changed <= set(server.merged_weights())
    assert any(k.endswith("attn.q.weight") for k in changed)


# --- end to end (tiny models) ----------------------------------------------------------------


def tiny(**transfer):
    return validate({
        "name": "tiny-distil", "seed": 3, "rounds": 2, "workload": {"name": "real"},
        "clients": [
            {"profile": "mobile", "count": 2, "model": "tiny-bert", "overrides": {"mean_off_s": 0}},
            {"profile": "cloud", "count": 2, "model": "tiny-bert"}],
        "server": {"model": "tiny-mpnet", "linear_probe": False},
        "network": {"channel": {"name": "static"}, "cells": [{}]},
        "task": {"dataset": "bbc-news", "kind": "classification", "max_train_examples": 200,
                 "eval_examples": 20, "partition": {"name": "iid"}},
        "training": {"local_steps": 2, "batch_size": 8, "max_length": 32, "lr": 5e-3},
        "transfer": {"name": "distillation", "proxy": {"size": 16, "batch": 8}, **transfer},
    })


def test_tiny_distillation_run_uploads_logits_and_trains_the_server(tmp_path):
    sim = Simulation(tiny())
    res = sim.run()
    s = res.summary
    assert s["rounds_completed"] == 2 and len(s["quality"]["server_by_round"]) == 2
    rows = list(csv.DictReader((write_run_dir(res, tmp_path / "run") / "events.csv").open()))
    # Each upload is the logit payload: 8 proxy examples × 5 labels (k = 128 capped at 5).
    enc = [r for r in rows if r["kind"] == "encode"]
    ups = [r for r in rows if r["kind"] == "uplink_end"]
    assert len(enc) == 8 and {int(r["bytes"]) for r in enc} == {topk.size_bytes(8, 5, 5, 16, 8)}
    assert sorted(int(r["bytes"]) for r in ups) == sorted(int(r["bytes"]) for r in enc)
    # The model comes down once; the clients keep their own adapters after that.
    downs = [(int(r["round"]), int(r["bytes"])) for r in rows if r["kind"] == "downlink_end"]
    assert {b for r, b in downs if r == 0} == {sim.workload.families["tiny-bert"].adapter_nbytes}
    assert {b for r, b in downs if r == 1} == {0}
    # The server model changed (the distilled weights) and clients' adapters are their own.
    wl = sim.workload
    assert wl.servers.primary.model.merged_weights()
    assert len(wl._personal) == 4
    assert not torch.equal(wl._personal[0]["classifier.weight"],
                           wl._personal[1]["classifier.weight"])


def test_tiny_distillation_is_deterministic_and_the_rules_differ():
    def outcome(sc):
        res = Simulation(sc).run()
        return res.summary["quality"]["server_by_round"], res.recorder.events_csv()

    a, b = outcome(tiny()), outcome(tiny())
    assert a == b
    sel = outcome(tiny(selective=True, logits={"k": 2}))
    assert sel[1] != a[1]  # k = 2 of 5: shorter uploads


def test_distillation_needs_a_server_model(capsys):
    with pytest.raises(Exception, match="distillation needs a server model"):
        validate({"name": "x", "rounds": 1, "workload": {"name": "real"},
                  "clients": [{"profile": "laptop", "count": 1, "model": "tiny-bert"}],
                  "server": {"model": None}, "transfer": {"name": "distillation"}})
    with pytest.raises(Exception, match="server_roles"):
        validate({"name": "x", "rounds": 1, "workload": {"name": "real"},
                  "clients": [{"profile": "laptop", "count": 1, "model": "tiny-bert"}],
                  "transfer": {"name": "distillation", "server_roles": ["qq"]}})


def test_compare_refuses_a_distillation_run_with_a_clear_error(tmp_path, capsys):
    rc = main(["compare", "scenarios/quickstart.yaml", "--set", "transfer.name=distillation",
               "--set", "server.model=tiny-mpnet", "--out", str(tmp_path / "c")])
    assert rc == 2
    assert "transfer.name" in capsys.readouterr().err


def test_mutual_transfer_sends_the_server_logits_down_and_the_clients_distil(tmp_path):
    sim = Simulation(tiny(mutual=True, client_steps=3, client_lr=5e-3))
    res = sim.run()
    wl = sim.workload
    rows = list(csv.DictReader((write_run_dir(res, tmp_path / "run") / "events.csv").open()))
    downs = [(int(r["round"]), int(r["bytes"])) for r in rows if r["kind"] == "downlink_end"]
    # Round 1's downloads are the server's payload on round 1's batch, once it has distilled:
    # 8 examples × 5 labels at 16 bits.
    assert {b for r, b in downs if r == 1} == {topk.size_bytes(8, 5, 5, 16, 8)}
    # ... and the client trained from its adapter distilled towards it: not its round-0 own.
    start, _ = wl._last[0]
    variant = wl.servers.primary
    assert not torch.equal(start["classifier.weight"], wl._personal[0]["classifier.weight"])
    # Its job's FLOPs hold the distillation's: more than the same run without mutual transfer.
    plain = Simulation(tiny())
    plain.run()
    flops = {int(r["client"]): float(r["detail"].split("=")[1]) for r in rows
             if r["kind"] == "train_start" and r["round"] == "1"}
    assert variant.transfer.cfg.mutual and flops
    plain_flops = {int(r["client"]): float(r["detail"].split("=")[1])
                   for r in csv.DictReader(io.StringIO(plain.rec.events_csv()))
                   if r["kind"] == "train_start" and r["round"] == "1"}
    assert plain_flops.keys() == flops.keys()
    assert all(flops[c] > plain_flops[c] for c in flops)


@pytest.mark.parametrize("transfer", [{"mutual": True}, {"weights": True, "projector": "pad"}],
                         ids=["mutual", "both"])
def test_a_distillation_run_resumes_identically(tmp_path, transfer):
    from test_checkpoint import _resume_from_each

    sc = tiny(**transfer)
    sc = validate({**sc.model_dump(mode="json"), "rounds": 3,
                   "output": {"checkpoint_every": 1}})
    assert _resume_from_each(sc, tmp_path) == 2


def test_distillation_gives_the_same_run_on_worker_processes():
    inline = Simulation(tiny()).run()
    sc = tiny()
    proc = validate({**sc.model_dump(mode="json"),
                     "executor": {"name": "process", "workers": 2}})
    out = Simulation(proc).run()
    assert out.recorder.events_csv() == inline.recorder.events_csv()
    assert out.summary["quality"] == inline.summary["quality"]


def tiny_generation(server="tiny-llama", **transfer):
    return validate({
        "name": "tiny-distil-gen", "seed": 1, "rounds": 2, "workload": {"name": "real"},
        "clients": [{"profile": "cloud", "count": 3, "model": "tiny-llama"}],
        "server": {"model": server},
        "network": {"channel": {"name": "static"}, "cells": [{}]},
        "task": {"dataset": "bbc-news", "kind": "generation", "max_train_examples": 60,
                 "eval_examples": 4, "partition": {"name": "iid"}},
        "training": {"local_steps": 1, "batch_size": 2, "max_length": 32},
        "transfer": {"name": "distillation", "proxy": {"size": 8, "batch": 3},
                     "logits": {"k": 16}, **transfer},
    })


def _payload_positions(sim, round_):
    wl = sim.workload
    trainer = wl.families["tiny-llama"].trainer
    return sum(len(target_ids(trainer, e)) for e in wl.proxy.take(wl.proxy.batch(round_)))


def test_generation_distillation_sends_top_k_token_logits_and_mutual_comes_back(tmp_path):
    sim = Simulation(tiny_generation(mutual=True))
    res = sim.run()
    assert len(res.summary["quality"]["server_by_round"]) == 2
    rows = list(csv.DictReader((write_run_dir(res, tmp_path / "run") / "events.csv").open()))
    vocab = sim.workload.families["tiny-llama"].trainer.model.config.vocab_size
    for r in (0, 1):  # one row per target token of the batch, 16 of the vocabulary each
        want = topk.size_bytes(_payload_positions(sim, r), 16, vocab, 16, 3)
        assert {int(x["bytes"]) for x in rows if x["kind"] == "encode" and x["round"] == str(r)
                } == {want}
    down1 = {int(x["bytes"]) for x in rows if x["kind"] == "downlink_end" and x["round"] == "1"}
    assert down1 == {topk.size_bytes(_payload_positions(sim, 1), 16, vocab, 16, 3)}


@pytest.mark.slow  # the smollm2 -> gemma3 token map (49k x 262k), cached after its first build
def test_generation_distillation_across_tokenizers():
    sim = Simulation(tiny_generation(server="tiny-gemma3"))
    res = sim.run()
    assert len(res.summary["quality"]["server_by_round"]) == 2
    transfer = sim.workload.servers.primary.transfer
    assert transfer.families["tiny-llama"].vmap.exact_fraction > 0.9
    assert sim.workload.servers.primary.model.merged_weights()


def test_an_out_of_domain_proxy_is_unlabelled_and_selective_takes_the_surest_teacher():
    sim = Simulation(tiny(proxy={"source": "rotten-tomatoes", "size": 12, "batch": 6},
                          selective=True))
    res = sim.run()
    proxy = sim.workload.proxy
    assert all(e.label is None for e in proxy.examples) and len(proxy.examples) == 12
    assert len(res.summary["quality"]["server_by_round"]) == 2
    assert sim.workload.servers.primary.model.merged_weights()
    with pytest.raises(Exception, match="task's own dataset"):
        tiny(proxy={"source": "bbc-news"})
    with pytest.raises(Exception, match="classification only"):
        validate({**tiny_generation().model_dump(mode="json"),
                  "transfer": {"name": "distillation", "proxy": {"source": "rotten-tomatoes"}}})


def test_both_transfers_at_once_send_the_update_and_the_logits(tmp_path):
    sim = Simulation(tiny(weights=True, projector="lstsq"))
    res = sim.run()
    wl = sim.workload
    rows = list(csv.DictReader((write_run_dir(res, tmp_path / "run") / "events.csv").open()))
    enc = [r for r in rows if r["kind"] == "encode"]
    logits_bytes = topk.size_bytes(8, 5, 5, 16, 8)
    adapter_payload = wl.codec.size_bytes(codecs.shapes_of(wl.families["tiny-bert"].adapter))
    # One upload: the LoRA update's payload (codec none) and the logits' beside it.
    assert {int(r["bytes"]) for r in enc} == {adapter_payload + logits_bytes}
    assert all(r["detail"].split(" ")[0].endswith("+topk-logits(k=5,vocab=5,bits=16)")
               for r in enc)
    # The weight path runs too: the family adapter moved (FedAvg), no personal adapters, and
    # every round's download is the family adapter again.
    assert wl.families["tiny-bert"].version == 2 and not wl._personal
    downs = {int(r["bytes"]) for r in rows if r["kind"] == "downlink_end"}
    assert downs == {wl.families["tiny-bert"].adapter_nbytes}
    # The server merged projected task vectors (attention weights of its own) and distilled.
    assert wl.servers.primary.model.families  # a projector per family
    assert wl.servers.primary.model.merged_weights()


def test_the_adaptive_k_reads_the_channel_as_the_scenario_says():
    def ks(estimate):
        doc = tiny_generation(logits={"adaptive": True, "k_min": 2, "k_max": 4096,
                                      "time_budget_s": 0.002, "estimate": estimate}
                              ).model_dump(mode="json")
        doc["network"] = {"channel": {"name": "pathloss", "fading": True,
                                      "coherence_time_s": 0.01},
                          "cells": [{"uplink_bandwidth_hz": 1.0e6}]}
        doc["clients"] = [{"profile": "mobile", "count": 3, "model": "tiny-llama",
                           "overrides": {"mean_off_s": 0}}]
        sim = Simulation(validate(doc))
        assert sim.codec_knowledge.estimate == estimate
        rows = csv.DictReader(io.StringIO(sim.run().recorder.events_csv()))
        return [int(r["detail"].split("k=")[1].split(",")[0]) for r in rows
                if r["kind"] == "encode"]

    exact, realistic = ks("exact"), ks("realistic")
    assert len(exact) == len(realistic) == 6
    assert len(set(exact)) > 1  # the channel differs per client and round, so does k
    assert exact != realistic  # the previous block with an error is not the block itself
