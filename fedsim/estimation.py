"""Channel knowledge: what a decision made now can know of a channel (issue 15 part 7).

A client learns its channel from pilots already past: it cannot see the fading block it is in,
let alone the ones to come. Two models, selectable wherever a decision reads the channel (the
selectors of ``fedsim.selection``, the ``adaptive`` codec's payload choice):

- ``exact``: the channel state now (the current coherence block) — an oracle, the upper bound;
- ``realistic`` (default): the previous block's state times a log-normal estimation error of
  ``estimate_error_db`` (one standard-normal draw per client, decision and round, hashed from
  the seed, so the same question in the same round gets the same answer whatever was asked in
  between), and only the flows already in the cell or known to be coming (no knowledge of other
  clients' future).

Wired links are known exactly either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Literal

from fedsim.rng import hashed_uniform_one

if TYPE_CHECKING:
    from fedsim.channels import Channel


@dataclass(frozen=True)
class ChannelKnowledge:
    """How a decision sees a channel state: ``exact`` or ``realistic`` (see the module text).
    ``key``: the hashed stream of the estimation errors (``fedsim.rng.key``)."""

    estimate: Literal["exact", "realistic"]
    error_db: float
    key: int

    @property
    def exact(self) -> bool:
        return self.estimate == "exact"

    def state(self, channel: Channel, direction: str, client: int, now_s: float,
              index: int) -> float:
        """``client``'s channel state as this decision sees it: the state now, or the previous
        block's times the estimation error of decision ``index``."""
        seen_s = now_s if self.exact else channel.previous_block_s(now_s)
        return channel.flow_state_one(direction, client, seen_s) * self.error_gain(client, index)

    def error_gain(self, client: int, index: int) -> float:
        """The linear factor the estimate is off by for ``client``'s decision ``index`` (1 when
        exact): 10^(error_db·z/10), z standard normal, the same for the same (client, index)."""
        if self.exact:
            return 1.0
        z = NormalDist().inv_cdf(hashed_uniform_one(self.key, client, index))
        return 10.0 ** (self.error_db * z / 10.0)
