"""The Flower side of benchmarks/bench_peers.py: fedsim's scenario as a Flower app.

A module of its own because Ray's workers import it, as ``flwr run`` imports an app: the
ClientApp's cache (the workload: trainer and data, built once per worker) then lives as long as the
worker, like a fedsim worker's. Needs the ``bench`` extra (Flower).

The ClientApp trains the fedsim client its message names (``config.client``) through fedsim's
own workload of the scenario, built as the engine builds it: that client's partition, batch
plan, validation split and seed, so the updates are the ones fedsim computes. The ServerApp
runs Flower's ``FedAvg`` (its weighted average of the returned weights, by ``num-examples`` =
the client's data set size, as fedsim's FedAvg) on the clients fedsim selected in each round,
and evaluates the federated adapter centrally on the scenario's evaluation examples after
each round.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch  # noqa: F401 (ArrayRecord.to_torch_state_dict wants it imported)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peer_workload import train_client, workload

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One local training job, fedsim's plan and seed: the start adapter arrives as arrays,
    the new weights go back."""
    cfg = msg.content["config"]
    c, round_ = int(cfg["client"]), int(cfg["fedsim-round"])
    start = msg.content["arrays"].to_torch_state_dict()
    res, size = train_client(str(cfg["scenario"]), c, round_, start)
    new = {k: v + res.delta[k] if k in res.delta else v for k, v in start.items()}
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(
        {"num-examples": size, "train_loss": res.losses[-1]})}), reply_to=msg)


class FedsimSelection(FedAvg):
    """Flower's FedAvg on given clients per round (node i, in sorted node-id order, plays
    fedsim client i; the message names the client, its fedsim round and the scenario)."""

    def __init__(self, selected: list[tuple[int, list[int]]], doc_json: str,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.selected, self.doc_json = selected, doc_json

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        nodes = sorted(grid.get_node_ids())
        round_, clients = self.selected[server_round - 1]
        return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
            {"client": c, "fedsim-round": round_, "scenario": self.doc_json,
             "server-round": server_round})}), message_type="train", dst_node_id=nodes[c])
            for c in clients]


def server_app(doc_json: str, selected: list[tuple[int, list[int]]], marks: list[float],
               history: list[dict[str, float]]) -> ServerApp:
    """The ServerApp: FedAvg over ``selected``; ``marks`` gets the time before round 1 and
    after each round's evaluation, ``history`` each round's metrics."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        wl = workload(doc_json)
        family = next(iter(wl.families.values()))

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if server_round == 0:  # called before round 1 is dispatched
                marks.append(time.time())
                return MetricRecord({})
            m = family.trainer.evaluate(arrays.to_torch_state_dict(), wl.eval_examples)
            history.append(m)
            marks.append(time.time())
            return MetricRecord({k: float(v) for k, v in m.items()})

        strategy = FedsimSelection(selected, doc_json, fraction_evaluate=0.0,
                                   min_available_nodes=wl.fleet.size)
        strategy.start(grid, ArrayRecord({k: v.clone() for k, v in family.adapter.items()}),
                       num_rounds=len(selected), evaluate_fn=evaluate)

    return app


def play_flower(doc: dict[str, Any], workers: int,
                selected: list[tuple[int, list[int]]]) -> dict[str, Any]:
    """Flower's simulation engine on the scenario: one supernode per client, ``workers``
    ClientApps at once (1 CPU each, Ray backend)."""
    from flwr.simulation import run_simulation
    doc_json = json.dumps(doc, sort_keys=True)
    marks: list[float] = []
    history: list[dict[str, float]] = []
    run_simulation(server_app=server_app(doc_json, selected, marks, history),
                   client_app=client_app, num_supernodes=sum(g["count"] for g in doc["clients"]),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": workers,
                                                 "include_dashboard": False}})
    return {"marks": marks, "selected": selected, "loss": [m.get("loss") for m in history],
            "accuracy": [m.get("accuracy") for m in history]}
