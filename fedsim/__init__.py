"""fedsim: a discrete-event simulator of federated LoRA fine-tuning over wireless networks."""

from fedsim.engine import Simulation, run
from fedsim.errors import FedsimError
from fedsim.metrics import RunResult, read_summary, write_run_dir
from fedsim.scenario import Scenario, ScenarioError, load

__all__ = [
    "FedsimError",
    "RunResult",
    "Scenario",
    "ScenarioError",
    "Simulation",
    "load",
    "read_summary",
    "run",
    "write_run_dir",
]
__version__ = "0.1.0"
