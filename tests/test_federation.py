"""The real workload inside the engine: tiny models end to end, and the quickstart itself."""

import csv
import json
import subprocess
import sys

import pytest

from fedsim.engine import Simulation
from fedsim.scenario import validate

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


TINY_TASK = {"dataset": "bbc-news", "kind": "classification", "max_train_examples": 200,
             "eval_examples": 40, "partition": {"name": "iid"}}


def tiny_scenario(**changes):
    doc = {
        "name": "tiny-real", "seed": 3, "rounds": 2,
        "workload": {"name": "real"},
        "clients": [
            {"profile": "mobile", "count": 2, "model": "tiny-bert", "overrides": {"mean_off_s": 0}},
            {"profile": "cloud", "count": 2, "model": "tiny-bert"},
        ],
        "network": {"channel": {"name": "static"}, "cells": [{}]},
        "task": TINY_TASK,
        "training": {"local_steps": 3, "batch_size": 8, "max_length": 32, "lr": 5e-3},
    }
    doc.update(changes)
    return validate(doc)


def test_tiny_real_run_end_to_end(tmp_path):
    from fedsim.metrics import write_run_dir

    sim = Simulation(tiny_scenario())
    res = sim.run()
    s = res.summary
    assert s["rounds_completed"] == 2
    assert s["quality"]["metric"] == "accuracy"
    assert len(s["quality"]["server_by_round"]) == 2
    assert all(0.0 <= v <= 1.0 for v in s["quality"]["server_by_round"])
    assert set(s["quality"]["clients_final"]) == {0, 1, 2, 3}
    # codec none: fp32 plus the payload's framing (names, shapes, CRC), so slightly below 1
    assert s["comm"]["bytes_up"] > 0 and 0.9 < s["comm"]["compression_ratio"] < 1.0
    out = write_run_dir(res, tmp_path / "run")
    rows = list(csv.DictReader((out / "events.csv").open()))
    # compute time on the simulated clock = FLOPs of the job / the device's FLOP/s
    fleet = sim.fleet
    starts = {(r["round"], r["client"]): (float(r["time_s"]), float(r["detail"].split("=")[1]))
              for r in rows if r["kind"] == "train_start"}
    ends = {(r["round"], r["client"]): float(r["time_s"]) for r in rows if r["kind"] == "train_end"}
    assert starts and starts.keys() == ends.keys()
    for (rnd, c), (t0, flops) in starts.items():
        want = flops / fleet.flops_per_s[int(c)]
        assert ends[(rnd, c)] - t0 == pytest.approx(want, rel=1e-3)
    # the upload carries the real encoded payload: its length in bytes
    enc = [r for r in rows if r["kind"] == "encode"]
    assert enc and all(int(r["bytes"]) > 0 for r in enc)


def test_device_too_small_fails_with_oom():
    sc = tiny_scenario(clients=[
        {"profile": "mobile", "count": 2, "model": "tiny-bert",
         "overrides": {"mean_off_s": 0, "memory_gib": 1e-4}},  # 100 KiB: no model fits
        {"profile": "cloud", "count": 1, "model": "tiny-bert"},
    ], rounds=1)
    s = Simulation(sc).run().summary
    assert s["overload"]["oom_failures"] == 2
    assert s["counts"]["updates_accepted"] == 1


def test_same_seed_same_summary_and_events(tmp_path):
    from fedsim.metrics import write_run_dir

    outs = []
    for i in range(2):
        res = Simulation(tiny_scenario(rounds=1)).run()
        d = write_run_dir(res, tmp_path / f"r{i}")
        s = json.loads((d / "summary.json").read_text())
        s.pop("wall_time_s")
        outs.append(((d / "events.csv").read_bytes(), s))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_quickstart_one_round_real_models(tmp_path):
    """The README's scenario with the real packaged minilm-l6 and mpnet-base, one round, end to
    end: fewer clients and evaluation examples than the README runs (the suite's time), the
    same models, data, projection and processes."""
    out = tmp_path / "qs"
    small = [a for kv in ("rounds=1", "clients.0.count=4", "clients.1.count=2",
                          "clients.2.count=2", "task.eval_examples=50") for a in ("--set", kv)]
    r = subprocess.run([sys.executable, "-m", "fedsim", "run", ROOT / "scenarios/quickstart.yaml",
                        *small, "--out", out], capture_output=True, text=True,
                       timeout=900, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds_completed"] == 1
    assert s["counts"]["updates_accepted"] > 0
    assert 0 < s["quality"]["server_by_round"][0] <= 1


# --- the server model: projected task vectors merged into it ---------------------------------


def server_weights(sim):
    return {k: v.clone() for k, v in sim.workload.servers.primary.model.weights().items()}


def test_client_updates_reach_the_server_model_through_projection():
    """tiny-bert clients, tiny-mpnet server: after a round the server's q/v weights (the roles
    the clients train) and its head have moved, nothing else; the server's metric is the run's
    primary metric, the family adapter's is reported beside it; ingest time includes the
    projection FLOPs."""
    sim = Simulation(tiny_scenario(rounds=1, aggregation={"name": "task-arithmetic"}))
    before = server_weights(sim)
    res = sim.run()
    after = server_weights(sim)
    moved = {k for k in before if not (before[k] == after[k]).all()}
    assert moved, "no server weight changed"
    for k in moved:
        assert ".attn.q." in k or ".attn.v." in k or k.startswith("classifier.out_proj"), k
    assert any(".attn.q." in k for k in moved) and any(".attn.v." in k for k in moved)
    q = sim.quality_by_round[0]
    assert q["accuracy"] == q["server/accuracy"] == res.summary["quality"]["server_by_round"][0]
    assert "tiny-bert/accuracy" in q
    # the server is evaluated as it is now: the same weights score the same again
    server = sim.workload.servers.primary.model
    assert server.evaluate(sim.workload.eval_examples)["accuracy"] == q["accuracy"]


def test_ingest_counts_decode_and_projection_flops():
    import numpy as np

    from fedsim.workload import Upload

    sim = Simulation(tiny_scenario(rounds=1))
    wl = sim.workload
    plan = wl.plan(0, 0)
    wl.download_bytes(0)
    upload = wl.encode(0, 0, wl.train(0, 0, plan), 1e6, None)
    assert isinstance(upload, Upload)
    ing = wl.ingest(0, upload)
    sent = upload.sent
    delta = ing.result.delta
    numel = sum(t.numel() for t in delta.values())
    proj = wl.servers.primary.model.flops_of_projection("tiny-bert", sent.start, delta)
    assert proj > 0
    assert ing.flops == pytest.approx(4.0 * numel + proj)
    assert np.isfinite(ing.flops)


def test_without_a_server_model_the_family_metric_is_primary():
    sim = Simulation(tiny_scenario(rounds=1, server={"model": None}))
    res = sim.run()
    assert not sim.workload.servers
    q = sim.quality_by_round[0]
    assert q["accuracy"] == q["tiny-bert/accuracy"] == res.summary["quality"]["server_by_round"][0]


def test_compare_feeds_every_variant_the_same_updates(tmp_path):
    """``fedsim compare``: one run, a server per projector x LARS, all starting from the same
    model; the table has the start row and one row per variant and round."""
    from fedsim.cli import main
    from fedsim.plots import plot_dir

    scenario = tmp_path / "s.yaml"
    import yaml

    doc = tiny_scenario(aggregation={"name": "task-arithmetic"}).model_dump(mode="json")
    scenario.write_text(yaml.safe_dump(doc))
    out = tmp_path / "cmp"
    assert main(["compare", str(scenario), "--projectors", "pad,lstsq", "--references", "none",
                 "--quiet", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    variants = [r["variant"] for r in rows]
    assert variants == ["start", "pad", "pad", "pad+lars", "pad+lars", "lstsq", "lstsq",
                        "lstsq+lars", "lstsq+lars"]
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 2 + 5 and "| start |" in table
    assert (out / "run" / "summary.json").is_file()
    summary = json.loads((out / "run" / "summary.json").read_text())
    first = [float(r["accuracy"]) for r in rows if r["variant"] == "pad"]
    assert summary["quality"]["server_by_round"] == pytest.approx(first)
    png = out / "plots" / "comparison.png"
    assert png.stat().st_size > 10_000
    assert plot_dir(out) == [png]


def test_compare_rejects_an_unknown_projector(tmp_path, capsys):
    from fedsim.cli import main

    assert main(["compare", str(ROOT / "scenarios" / "quickstart.yaml"), "--projectors",
                 "pad,warp", "--out", str(tmp_path / "x")]) == 2
    assert "--projectors: unknown warp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- what α weighs, LARS once, exact LoRA aggregation, prompts -------------------------------


def test_ingest_reports_n_k_heterogeneity_and_the_validation_quality():
    """Task arithmetic: each client holds out ``training.validation_examples`` of its partition
    (disjoint from every batch, the same every round); the plan's FLOPs (what the simulated
    clock waits) include the two validation passes; the result carries n_k = the partition's
    size (not the examples the job touched) and the client's heterogeneity measures."""
    import numpy as np

    from fedsim.heterogeneity import heterogeneity

    sim = Simulation(tiny_scenario(rounds=1, aggregation={"name": "task-arithmetic"},
                                   training={"local_steps": 2, "batch_size": 8, "max_length": 32,
                                             "lr": 5e-3, "validation_examples": 6}))
    wl = sim.workload
    assert [len(v) for v in wl.validation] == [6] * 4
    plan = wl.plan(0, 0)
    p = plan.context
    assert p.validation == tuple(wl.validation[0].tolist())
    assert not {i for b in p.batches for i in b} & set(p.validation)
    assert wl.plan(0, 1).context.validation == p.validation  # the same split every round
    assert plan.flops == p.flops > 0 and p.validation_tokens > 0
    wl.download_bytes(0)
    update = wl.train(0, 0, plan)
    trainer = wl._family(0).trainer
    held = [wl._examples(0)[i] for i in p.validation]
    assert update.loss_before == pytest.approx(trainer.evaluate(wl._start(0), held)["loss"])
    ing = wl.ingest(0, wl.encode(0, 0, update, 1e6, None))
    r = ing.result
    assert r.quality == pytest.approx(update.loss_before - update.loss_after)
    assert r.dataset_size == len(wl.parts[0]) == 50 != r.num_samples == p.num_samples == 16
    train = wl.task.train
    labels = np.array([e.label for e in train])
    want = heterogeneity(train, labels, len(wl.task.label_names), wl.parts)
    assert r.heterogeneity == {m: v[0] for m, v in want.items()}
    assert 0 < r.heterogeneity["js-similarity"] <= 1


def test_fedavg_holds_out_no_validation_split():
    wl = Simulation(tiny_scenario(rounds=1)).workload
    assert all(len(v) == 0 for v in wl.validation)
    assert wl.plan(0, 0).context.validation == ()


def test_lars_applies_once_in_the_server_space():
    """With a server model LARS is the server's (its trust ratios against the server's
    weights); the family's LoRA rule runs without it. Without a server model the family's
    rule is the only aggregation, and it applies LARS."""
    lars = {"name": "task-arithmetic", "lars": True, "eta": 0.01}
    wl = Simulation(tiny_scenario(rounds=1, aggregation=lars,
                                  transfer={"projector": "pad"})).workload
    assert wl.aggregator.cfg.lars is False
    assert wl.servers.primary.aggregator.cfg.lars is True
    alone = Simulation(tiny_scenario(rounds=1, aggregation=lars, server={"model": None}))
    assert alone.workload.aggregator.cfg.lars is True


def test_exact_lora_family_adapter_is_the_weighted_mean_of_products():
    """aggregation.lora=exact with r = the hidden size (64, so every product fits): after a round
    each module's B'A' is B0A0 + Σ wᵢ (BᵢAᵢ − B0A0), wᵢ FedAvg's nᵢ / Σ n over the arrivals."""
    import torch

    from fedsim.aggregators import lora_modules

    sc = tiny_scenario(rounds=1, server={"model": None},
                       aggregation={"name": "fedavg", "lora": "exact"},
                       training={"local_steps": 2, "batch_size": 8, "max_length": 32,
                                 "lr": 5e-2, "lora": {"r": 64, "alpha": 64}})
    sim = Simulation(sc)
    wl = sim.workload
    fam = wl.families["tiny-bert"]
    start = {k: v.clone() for k, v in fam.adapter.items()}
    seen = []
    aggregate = wl.aggregate

    def spy(round_, arrivals):
        seen.extend(arrivals)
        return aggregate(round_, arrivals)

    wl.aggregate = spy
    sim.run()
    assert seen and fam.version == 1
    # FedAvg: n_k, each client's local data set, not the examples one job touched
    sizes = torch.tensor([a.result.dataset_size * a.weight for a in seen], dtype=torch.float64)
    w = sizes / sizes.sum()
    for m in lora_modules(start):
        a0, b0 = start[m + ".lora_A.weight"].double(), start[m + ".lora_B.weight"].double()
        want = b0 @ a0 + sum(
            wi * ((b0 + x.result.delta[m + ".lora_B.weight"]) @ (a0 + x.result.delta[
                m + ".lora_A.weight"]) - b0 @ a0) for wi, x in zip(w, seen, strict=True))
        got = fam.adapter[m + ".lora_B.weight"].double() @ fam.adapter[m + ".lora_A.weight"].double()
        assert float(want.norm()) > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_clients_train_on_the_prompt_the_server_is_scored_with():
    """bbc-news headline generation: a family's trainer (as workers build it, FamilyKey.trainer)
    and the server model encode the same prompt, the dataset's "{text}\\nHeadline:"."""
    from fedsim.data import load_dataset
    from fedsim.federation import FamilyKey
    from fedsim.server import ServerModel
    from fedsim.training import LocalTrainingConfig

    cfg = LocalTrainingConfig(max_length=32, target_roles=("q", "v"))
    client = FamilyKey("tiny-llama", "generation", None, cfg, 0, "bbc-news", "generation")
    client = client.trainer()
    server = ServerModel("tiny-llama", "generation", None, 0, projector="pad", max_length=32,
                         dataset="bbc-news")
    assert client.task.prompt == server.trainer.task.prompt == "{text}\nHeadline:"
    example = load_dataset("bbc-news", "generation").train[0]
    row, = client._encode(example)
    prompt = [t for t, y in zip(row.ids, row.labels, strict=True) if y == -100]
    room = 32 - (len(row.ids) - len(prompt))
    assert prompt == server.trainer.task.prompt_ids(server.tokenizer, example.text, room)
    assert client.tokenizer.decode(prompt).rstrip().endswith("Headline:")


def recording_executor(submitted: list):
    """An inline executor (each job run in this process) that notes each job in
    ``submitted``."""
    from fedsim.executors import InlineExecutor
    from fedsim.plugins import EXECUTORS

    class Recording(InlineExecutor):
        def submit(self, job):
            submitted.append(job)
            return super().submit(job)

    return Recording(EXECUTORS.parse({"name": "inline"}))


@pytest.mark.parametrize(("executor", "on_workers"), [("process", True), ("inline", False)])
def test_each_clients_final_score_runs_where_its_jobs_run(executor, on_workers):
    """Under an executor whose jobs leave this process, the end-of-run client scores are
    EvalJobs on its workers (side by side); inline, they run here on the workload's trainers.
    The numbers are the same either way."""
    from fedsim.federation import EvalJob

    sim = Simulation(tiny_scenario(rounds=1, executor={"name": "inline"}))
    sim.run()
    here = sim.workload.client_metrics(sim.executor)
    submitted = []
    sim.workload.scenario = tiny_scenario(rounds=1, executor={"name": executor})
    scores = sim.workload.client_metrics(recording_executor(submitted))
    assert bool(submitted) == on_workers
    assert all(isinstance(j, EvalJob) for j in submitted)
    assert scores == here and set(scores) == {0, 1, 2, 3}


def test_client_eval_examples_sets_how_many_examples_score_each_client():
    """``task.client_eval_examples``: each client's last model on the first that many
    evaluation examples; 0 scores none (and submits no job)."""
    from fedsim.federation import evaluate_on_threads

    sim = Simulation(tiny_scenario(rounds=1, executor={"name": "inline"},
                                   task={**TINY_TASK, "client_eval_examples": 5}))
    sim.run()
    wl = sim.workload
    scores = wl.client_metrics(sim.executor)
    start, delta = wl._last[0]
    model = {k: v + delta[k] if k in delta else v for k, v in start.items()}
    assert scores[0] == evaluate_on_threads(wl._family(0).trainer, model, wl.eval_examples[:5])
    assert scores[0] != evaluate_on_threads(wl._family(0).trainer, model, wl.eval_examples)
    submitted = []
    wl.scenario = tiny_scenario(rounds=1, executor={"name": "process"},
                                task={**TINY_TASK, "client_eval_examples": 0})
    assert wl.client_metrics(recording_executor(submitted)) == {}
    assert not submitted
