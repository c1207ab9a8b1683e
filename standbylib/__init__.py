"""Shared library of the standby appliance.

Code used by more than one role lives here: block devices, the copy-on-write
snapshot engine (patent WO 96/12232), size parsing and the error hierarchy.
Nothing in this package imports gRPC, Prometheus or structlog; the roles
(`primary`, `standby`, `backupnode`) wire it to the network, metrics and logs.
"""

__version__ = "0.1.0"
