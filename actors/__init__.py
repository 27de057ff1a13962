"""georep's actors: the pipeline of a worker and the secondary-side host.

Primary side: :class:`Supervisor` builds and runs :class:`Crawler` -> :class:`Batcher`
-> :class:`Syncer` pool, talking to the secondary through :class:`RemoteProxy`.
Secondary side: :mod:`actors.secondary_host` (EntryApplier and Lister actors).
"""

from actors.batcher import Batcher
from actors.crawler import Crawler
from actors.inspect import Inspectable, snapshot_actors
from actors.ledger import Failure, Ledger
from actors.remote import ConnectError, RemoteProxy
from actors.supervisor import Summary, Supervisor, SyncOptions
from actors.syncer import Syncer

__all__ = ["Batcher", "ConnectError", "Crawler", "Failure", "Inspectable", "Ledger",
           "RemoteProxy", "Summary", "Supervisor", "Syncer", "SyncOptions", "snapshot_actors"]
