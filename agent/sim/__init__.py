"""`strata simulate`'s engine: thousands of virtual devices on one asyncio loop, over real gRPC.

Each virtual device speaks AgentService exactly as an agent daemon does (same
messages, same signed `local` manifests, same checks on every model it is
served), only as coroutines instead of threads, so one process can hold 10,000
of them against real aggregators. See `agent.sim.device` for what a device does
and `agent.sim.run` for the run, its stop conditions and its report.
"""

from agent.sim.options import Delay, SimOptions
from agent.sim.run import Progress, SimReport, Simulation
from agent.sim.stats import LatencySummary, Receipt, RoundStats

__all__ = ["Delay", "LatencySummary", "Progress", "Receipt", "RoundStats", "SimOptions", "SimReport", "Simulation"]
