"""iocore.records: configuration and statistics, the bottom layer of tsproxy (after ATS's records).

- ``spec``: the one table of ``proxy.config.*`` records (type, default, reload/restart, check).
- ``parser``: records.config -> an immutable ``RecordsConfig`` snapshot; ``load_records``.
- ``config_processor``: refcounted snapshots so a reload never frees a table in use.
- ``stats``: ``proxy.process.*`` counters in shared memory, one slot per process.
- ``gen``: writes etc/tsproxy/records.config and docs/records.md from the table.

Nothing here imports from iocore.net, iocore.eventsystem or tsproxy, and importing a
module only builds constant tables.
"""
