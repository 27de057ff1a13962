"""georep's actors: the pipeline of a worker and the secondary-side host.

Primary side: :class:`Supervisor` builds and runs :class:`Crawler` -> :class:`Batcher`
-> :class:`Syncer` pool, talking to the secondary through :class:`RemoteProxy`.
Secondary side: :mod:`actors.secondary_host` (EntryApplier and Lister actors).
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are loaded on first use (PEP 562): ``georep-node secondary`` imports only the
# secondary host's modules, which keeps the primary-side pipeline (psutil, http.server,
# the recorder) out of every secondary's start-up.
_WHERE = {
    "Batcher": "actors.batcher", "ConnectError": "actors.remote", "Crawler": "actors.crawler",
    "Failure": "actors.ledger", "Inspectable": "actors.inspect", "Ledger": "actors.ledger",
    "RemoteProxy": "actors.remote", "Summary": "actors.supervisor",
    "Supervisor": "actors.supervisor", "Syncer": "actors.syncer",
    "SyncOptions": "actors.supervisor", "snapshot_actors": "actors.inspect",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
