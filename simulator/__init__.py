"""A simulator of service B's imaging export API, for medsync's tests, demo and benchmarks.

Quick start::

    from simulator import BSimulator, SimConfig

    with BSimulator(SimConfig(seed=1, patients=5, clock="manual"), api_key="k") as sim:
        sim.base_url             # http://127.0.0.1:PORT/api/v1
        sim.delete("studies", "stu_000000000001")
        sim.set_faults(throttle_every=3)
        list(sim.live_records("images"))

Out of process: ``python -m simulator --api-key K ...`` (see ``simulator.__main__``) and
``simulator.client.SimAdminClient`` / ``simulator.client.spawn``.
"""

from simulator.config import DEFECT_KINDS, UNKNOWN_ENUM_KINDS, FaultConfig, SimConfig
from simulator.model import FIELDS, Catalogue
from simulator.server import BSimulator
from simulator.timefmt import parse as parse_timestamp
from simulator.vocab import RESOURCES

__all__ = [
    "DEFECT_KINDS",
    "FIELDS",
    "RESOURCES",
    "UNKNOWN_ENUM_KINDS",
    "BSimulator",
    "Catalogue",
    "FaultConfig",
    "SimConfig",
    "parse_timestamp",
]
