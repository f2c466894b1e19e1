"""`strata demo`: a whole fleet on this machine, training a real model on real data.

It starts a coordinator, N aggregators and M agents (grouped several per process)
as separate OS processes, places agents with the same consistent-hash ring the
aggregators use, gives each aggregator's agents a class-skewed share of the
digits data (so semi-global models matter), and follows every aggregator's
rounds. Each closed round is evaluated here, on a held-out test split no agent
trains on: the cluster model (this aggregator's agents only) and the semi-global
model (blended with peers). At the end it stops every process it started, also
on Ctrl-C, and prints the final model's CID and lineage.

- `fleet`: the typed configs (the daemons' own config dataclasses, written with
  strata.config.dump_config) and the processes;
- `observe`: everything the demo reads from the running fleet, through public
  interfaces only (`strata history`'s reader, the coordinator's model index, the
  relay's metrics endpoint);
- `follow`: evaluating and printing each closed round;
- `report`: the final summary and its text;
- `run`: the whole run, start to stop.

All models go to the default store (~/.strata/store or $STRATA_STORE), so
`strata lineage <final_model>` works afterwards with no flags.
"""

from strata.demo.fleet import DemoOptions
from strata.demo.run import run_demo

__all__ = ["DemoOptions", "run_demo"]
