"""Client selection (registry ``SELECTORS``): which available clients a round starts.

- ``uniform``: k distinct clients uniformly at random (the ``selection`` stream of the seed);
  with ``over_selection`` > 1, ceil(over_selection * k) of them and the round keeps the first k
  that arrive (Bonawitz et al. 2019, "Towards federated learning at scale": 130 % selected).
- ``deadline-aware`` (FedCS, Nishio & Yonetani 2019): greedily, fastest expected update first,
  add a client while every chosen client's expected update, recomputed with the cell shared by
  the clients chosen so far, still fits the deadline (times ``margin``); at most k.
- ``fastest-k`` (FedScale's over-commitment, Lai et al. 2022): the ceil(over_selection * k)
  clients of shortest expected update; the round keeps the first k that arrive and stops the
  rest (``over_selected`` events); async rounds have no such close and refuse it.
- ``utility`` (Oort, Lai et al. 2021): statistical utility |B_i|·sqrt(mean L²) of the client's
  last update (its examples and the RMS of its training losses; the examples alone where the
  workload reports no loss) times the system factor (T/t_i)^penalty when its expected time t_i
  exceeds the preferred round time T (1 otherwise); an ``exploration`` share of the k slots goes
  to clients never seen yet, drawn at random, the rest to the highest utilities.

The expected time of one update is what the selector models, in seconds:
``download_bytes·8 / r_down + flops / flops_per_s + upload_bytes·8 / r_up``, r being the rate
the client's cell would give it shared by the chosen clients of that cell (all download at the
round's start; their uploads are counted as overlapping, the conservative case). The rates come
from the channel (with inter-cell interference on, the SINR counts the chosen clients of the
co-channel cells sending at once, besides what is active now): ``estimate: exact`` reads the
channel state now (today's current coherence block), ``realistic`` the previous block's state
times a log-normal estimation error of ``estimate_error_db`` (a client learns its channel from
pilots already past and cannot know the fading to come). Wired clients' rates are known exactly.

Every non-uniform selector writes ``expected_s=`` in its ``select`` events and compares, per
update that finished its upload, what it expected with the time from selection to the upload's
end: ``summary.json`` ``selection`` holds both (p50, p95) and the absolute error.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.channels import DOWNLINK, UPLINK, SharedLink
from fedsim.estimation import ChannelKnowledge
from fedsim.plugins import SELECTORS, SelectorConfig
from fedsim.rng import key, stream

if TYPE_CHECKING:
    from fedsim.engine import Simulation


class Selector(ABC):
    """Chooses the clients a round (or an async slot) starts, among the available ones."""

    name: str

    def __init__(self, cfg: SelectorConfig, sim: Simulation) -> None:
        self.cfg, self.sim = cfg, sim
        self.expected: dict[int, tuple[float, float]] = {}  # client -> (selected at, expected s)
        self.pairs: list[tuple[float, float]] = []  # (expected s, actual s) per finished upload
        self.knowledge = ChannelKnowledge(getattr(cfg, "estimate", "exact"),
                                          getattr(cfg, "estimate_error_db", 0.0),
                                          key(sim.scenario.seed, "selection-estimate"))
        self._rng = stream(sim.scenario.seed, "selection-explore")  # utility's exploration

    @abstractmethod
    def select(self, candidates: np.ndarray, k: int | None, round_: int) -> list[int]:
        """Clients to start in ``round_``, ascending; all candidates when ``k`` is None (unless
        the rule leaves some out)."""

    def target(self, k: int | None) -> int | None:
        """How many arrivals close a round of ``k`` (None: wait for every selected client)."""
        return None

    # -- expected times ------------------------------------------------------------------------

    def expected_s(self, clients: Sequence[int], round_: int, shared: bool = True
                   ) -> np.ndarray:
        """Expected update time (s) of each of ``clients`` in ``round_`` if exactly they were
        selected (``shared=False``: each alone in its cell)."""
        sim, wl = self.sim, self.sim.workload
        clients = [int(c) for c in clients]
        cells, counts = np.unique(sim.fleet.cell[clients], return_counts=True)
        share = dict(zip(cells.tolist(), counts.tolist(), strict=True))
        out = np.empty(len(clients))
        # The chosen clients' own uploads interfere at the co-channel sites (I/N per site).
        inter = sim.network.interference
        extra = (np.zeros(0) if inter is None or not shared or not clients else
                 (inter.gain_w[clients] * inter.cochannel[sim.fleet.cell[clients].clip(0)]
                  ).sum(axis=0) / inter.noise_w)
        for i, c in enumerate(clients):
            n = share[int(sim.fleet.cell[c])] if shared else 1
            cell = int(sim.fleet.cell[c])
            ratio = float(extra[cell]) if len(extra) and cell >= 0 else 0.0
            down_s = wl.download_bytes_estimate(c) * 8.0 / self._rate(c, DOWNLINK, n, round_)
            up_s = wl.upload_bytes_estimate(c) * 8.0 / self._rate(c, UPLINK, n, round_, ratio)
            out[i] = down_s + wl.plan(c, round_).flops / sim.fleet.flops_per_s[c] + up_s
        return out

    def _rate(self, client: int, direction: str, sharing: int, round_: int,
              interference: float = 0.0) -> float:
        """bits/s ``client`` expects among ``sharing`` flows of its cell (itself included),
        with ``interference`` (I/N at its site) from the other chosen clients' uploads on top
        of what is active now."""
        link = self.sim.network.link(client, direction)
        if not isinstance(link, SharedLink):
            return link.estimate_rate_bps(client)
        ch, now, known = link.channel, self.sim.env.now, self.knowledge
        # exact: the state now; realistic: the previous block's, off by a log-normal error
        # (fedsim.estimation), one draw per (client, direction, round)
        state = known.state(ch, direction, client, now, round_ * 2 + (direction == DOWNLINK))
        rate = ch.rate_among(link.cell, direction, state / (1.0 + interference), sharing)
        return rate if rate > 0 else 1e-9  # an outage: expected to take forever

    def _record(self, chosen: Sequence[int], expected: Sequence[float]) -> list[int]:
        now = self.sim.env.now
        for c, e in zip(chosen, expected, strict=True):
            self.expected[int(c)] = (now, float(e))
        return sorted(int(c) for c in chosen)

    def detail(self, client: int) -> str:
        """The ``select`` event's detail: what this selector expects of the update."""
        got = self.expected.get(client)
        return "" if got is None else f"expected_s={got[1]:.6g}"

    def uploaded(self, client: int) -> None:
        """The update of ``client`` finished its upload now: keep (expected, actual)."""
        got = self.expected.pop(client, None)
        if got is not None:
            self.pairs.append((got[1], self.sim.env.now - got[0]))

    def arrived(self, client: int, num_samples: int, loss_rms: float) -> None:
        """An accepted update of ``client`` (utility-based selectors learn from it)."""

    def summary(self) -> dict[str, Any] | None:
        """``summary.json``'s ``selection`` (None: the uniform rule models nothing)."""
        if not self.pairs:
            return {"name": self.name, "uploads": 0}
        e, a = (np.array(x) for x in zip(*self.pairs, strict=True))
        q = {"p50": 50, "p95": 95}
        return {"name": self.name, "uploads": len(self.pairs),
                "expected_s": {k: float(np.percentile(e, p)) for k, p in q.items()},
                "actual_s": {k: float(np.percentile(a, p)) for k, p in q.items()},
                "abs_error_s": {k: float(np.percentile(np.abs(a - e), p)) for k, p in q.items()}}

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"expected": {str(c): list(v) for c, v in self.expected.items()},
                "pairs": [list(p) for p in self.pairs], "rng": self._rng.bit_generator.state}

    def restore(self, doc: dict[str, Any]) -> None:
        if not doc:
            return
        self.expected = {int(c): (float(v[0]), float(v[1])) for c, v in doc["expected"].items()}
        self.pairs = [(float(a), float(b)) for a, b in doc["pairs"]]
        self._rng.bit_generator.state = doc["rng"]


@SELECTORS.register("uniform")
class Uniform(Selector):
    """ceil(over_selection·k) distinct clients uniformly at random among the candidates."""

    def select(self, candidates: np.ndarray, k: int | None, round_: int) -> list[int]:
        n = None if k is None else math.ceil(self.cfg.over_selection * k)
        if n is None or len(candidates) <= n:
            return [int(c) for c in candidates]
        return sorted(int(c) for c in self.sim.select_rng.choice(candidates, size=n,
                                                                 replace=False))

    def target(self, k: int | None) -> int | None:
        return k if self.cfg.over_selection > 1 else None

    def summary(self) -> dict[str, Any] | None:
        return None


def deadline_of(sim: Simulation, own: float | None) -> float:
    """A selector's deadline (s): its own, else the round policy's (validated to exist)."""
    if own is not None:
        return own
    return float(sim.scenario.round_policy.deadline_s)


@SELECTORS.register("deadline-aware")
class DeadlineAware(Selector):
    """FedCS: the most clients whose expected updates all fit the deadline (module text)."""

    def select(self, candidates: np.ndarray, k: int | None, round_: int) -> list[int]:
        budget_s = deadline_of(self.sim, self.cfg.deadline_s) * self.cfg.margin
        alone = self.expected_s(candidates, round_, shared=False)
        order = [int(candidates[i]) for i in np.argsort(alone, kind="stable")]
        chosen: list[int] = []
        times = np.zeros(0)  # the chosen clients' expected times, sharing with each other
        for c in order:
            if k is not None and len(chosen) >= k:
                break
            trial = self.expected_s([*chosen, c], round_)
            if trial.max() <= budget_s:  # the newcomer and everyone it now shares with fit
                chosen, times = [*chosen, c], trial
        return self._record(chosen, times)


@SELECTORS.register("fastest-k")
class FastestK(Selector):
    """FedScale's over-commitment: ceil(over_selection·k) fastest, keep the first k."""

    def select(self, candidates: np.ndarray, k: int | None, round_: int) -> list[int]:
        n = len(candidates) if k is None else min(len(candidates),
                                                   math.ceil(self.cfg.over_selection * k))
        alone = self.expected_s(candidates, round_, shared=False)
        order = [int(candidates[i]) for i in np.argsort(alone, kind="stable")][:n]
        return self._record(order, self.expected_s(order, round_))

    def target(self, k: int | None) -> int | None:
        return k


@SELECTORS.register("utility")
class Utility(Selector):
    """Oort: statistical utility x system speed, with exploration of unseen clients."""

    def __init__(self, cfg: SelectorConfig, sim: Simulation) -> None:
        super().__init__(cfg, sim)
        self.utility: dict[int, float] = {}  # client -> |B|·sqrt(mean L²) of its last update

    def select(self, candidates: np.ndarray, k: int | None, round_: int) -> list[int]:
        cands = [int(c) for c in candidates]
        if k is None or len(cands) <= k:
            return self._record(cands, self.expected_s(cands, round_))
        preferred_s = deadline_of(self.sim, self.cfg.preferred_s)
        seen = [c for c in cands if c in self.utility]
        unseen = [c for c in cands if c not in self.utility]
        explore = min(len(unseen), max(k - len(seen), round(self.cfg.exploration * k)))
        picked = ([int(c) for c in self._rng.choice(unseen, size=explore, replace=False)]
                  if explore else [])
        if seen and k > explore:
            t = self.expected_s(seen, round_, shared=False)
            speed = np.where(t > preferred_s, (preferred_s / t) ** self.cfg.straggler_penalty,
                             1.0)
            score = np.array([self.utility[c] for c in seen]) * speed
            best = np.argsort(-score, kind="stable")[:k - explore]
            picked += [seen[i] for i in best]
        return self._record(picked, self.expected_s(picked, round_))

    def arrived(self, client: int, num_samples: int, loss_rms: float) -> None:
        loss = loss_rms if math.isfinite(loss_rms) else 1.0
        self.utility[client] = num_samples * loss

    def state(self) -> dict[str, Any]:
        return super().state() | {"utility": {str(c): u for c, u in self.utility.items()}}

    def restore(self, doc: dict[str, Any]) -> None:
        super().restore(doc)
        if doc:
            self.utility = {int(c): float(u) for c, u in doc.get("utility", {}).items()}


def make_selector(cfg: SelectorConfig, sim: Simulation) -> Selector:
    return SELECTORS.get(cfg.name)(cfg, sim)
