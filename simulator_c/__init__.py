"""A simulator of service C's archive API v2, for medsync's tests, demo and benchmarks.

Quick start::

    from simulator_c import CSimulator, SimConfig

    with CSimulator(SimConfig(seed=1, participants=5, clock="manual"), token="t") as sim:
        sim.base_url                      # http://127.0.0.1:PORT/v2
        sim.delete("files", sim.uuid("files", 3))
        sim.set_faults(internal_every=3)
        list(sim.live_records("files"))

Out of process: ``python -m simulator_c --token T ...`` (see ``simulator_c.__main__``) and
``simulator_c.client.CSimAdminClient`` / ``simulator_c.client.spawn``.
"""

from simulator_c.config import DEFECT_KINDS, SCHEMA_DEFECT_KINDS, FaultConfig, SimConfig, kinds_of
from simulator_c.model import Catalogue, Snapshot, is_relative_key
from simulator_c.server import CSimulator
from simulator_c.vocab import BUCKETS, FIELDS, KNOWN_CODES, RESOURCES

__all__ = [
    "BUCKETS",
    "DEFECT_KINDS",
    "FIELDS",
    "KNOWN_CODES",
    "RESOURCES",
    "SCHEMA_DEFECT_KINDS",
    "CSimulator",
    "Catalogue",
    "FaultConfig",
    "SimConfig",
    "Snapshot",
    "is_relative_key",
    "kinds_of",
]
