"""Shared library of the standby appliance: the code more than one role uses.

- The copy-on-write snapshot engine (`standbylib.snapshot`, patent WO 96/12232) and the block layer it
  stands on (`blockdev`, `rawfile`, `readplan`), with the error hierarchy (`errors`) and size parsing
  (`units`). These import no network, RPC, logging or metrics package.
- The NBD protocol, server and client (`standbylib.nbd`).
- The replication wire format (`standbylib.rpc`: the generated protobuf modules, the hand-written batch
  encoder and decoder, the data channel's frames) and the block checksums of verify (`checksums`).
- The daemons' runtime (`standbylib.runtime`): configuration, logs (structlog), metrics
  (prometheus-client), gRPC servers and channels, TLS.

Nothing here imports a role (`primary`, `standby`, `backupnode`); `make lint` checks both rules
(`[tool.importlinter]` in pyproject.toml).
"""

__version__ = "0.1.0"
