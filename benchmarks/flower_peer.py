"""The Flower side of benchmarks/bench_peers.py: fedsim's scenario as a Flower app.

A module of its own because Ray's workers import it, as ``flwr run`` imports an app: the
ClientApp's cache (the trainer and the data, built once per worker) then lives as long as the
worker, like a fedsim worker's. Needs the ``bench`` extra (Flower).

The ClientApp trains the fedsim client its message names (``config.client``): that client's
partition, batch plan, validation split and seed, from fedsim's own functions, so the updates
are the ones fedsim computes. The ServerApp runs Flower's ``FedAvg`` (its weighted average of
the returned weights, by ``num-examples`` = the client's data set size, as fedsim's FedAvg)
on the clients fedsim selected in each round, and evaluates the federated adapter centrally on
the scenario's evaluation examples after each round.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

_STATE: dict[str, dict[str, Any]] = {}  # per process: scenario JSON -> trainer and data


def client_state(doc_json: str) -> dict[str, Any]:
    """The scenario's trainer (its base model loaded once), training split, partitions,
    validation splits and evaluation examples, built on first use in this process."""
    if doc_json not in _STATE:
        from fedsim.data import TaskData, load_dataset
        from fedsim.federation import FamilyKey, local_config, partition_clients, validation_splits
        from fedsim.scenario import validate
        sc = validate(json.loads(doc_json))
        full = load_dataset(sc.task.dataset, sc.task.kind)
        n = sc.task.max_train_examples
        train = full.train[:n] if n else full.train
        task = TaskData(full.name, full.task, train, full.test, full.label_names, full.metric)
        parts = partition_clients(task, sc, sum(g.count for g in sc.clients))
        key = FamilyKey(sc.clients[0].model, task.task,
                        len(task.label_names) if task.label_names else None, local_config(sc),
                        sc.seed, sc.task.dataset, sc.task.kind)
        _STATE[doc_json] = {"sc": sc, "train": train, "parts": parts,
                            "validation": validation_splits(sc, parts), "trainer": key.trainer(),
                            "eval": full.test[: sc.task.eval_examples]}
    return _STATE[doc_json]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One local training job: the start adapter arrives as arrays, the new weights go back."""
    from fedsim.federation import job_seed
    cfg = msg.content["config"]
    c, round_ = int(cfg["client"]), int(cfg["fedsim-round"])
    st = client_state(str(cfg["scenario"]))
    start = msg.content["arrays"].to_torch_state_dict()
    examples = [st["train"][i] for i in st["parts"][c]]
    seed = job_seed(st["sc"].seed, c, round_)
    plan = st["trainer"].plan(examples, seed, validation=st["validation"][c])
    res = st["trainer"].train(start, examples, plan, seed)
    new = {k: v + res.delta[k] if k in res.delta else v for k, v in start.items()}
    return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(
        {"num-examples": len(st["parts"][c]), "train_loss": res.losses[-1]})}), reply_to=msg)


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
        st = client_state(doc_json)
        initial = st["trainer"].initial_adapter()

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if server_round == 0:  # called before round 1 is dispatched
                marks.append(time.time())
                return MetricRecord({})
            m = st["trainer"].evaluate(arrays.to_torch_state_dict(), st["eval"])
            history.append(m)
            marks.append(time.time())
            return MetricRecord({k: float(v) for k, v in m.items()})

        strategy = FedsimSelection(selected, doc_json, fraction_evaluate=0.0,
                                   min_available_nodes=len(st["parts"]))
        strategy.start(grid, ArrayRecord({k: v.clone() for k, v in initial.items()}),
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
