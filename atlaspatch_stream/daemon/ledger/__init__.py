"""The daemon's ledger: one SQLite record per slide, so that no slide is lost or repeated across restarts.

By layer (reference `service-and-daemon.md` §2); callers import from the layer modules:
- `states`: the pure state machine and the retry/backoff rules;
- `store`: the SQL, on one `sqlite3` connection;
- `facade`: the async `Ledger`, on its own `WriterThread` (the helper the H5 store uses too);
- `status`: the `atlaspatch status` view and the operator's synchronous commands;
- `holder`: the state folder's lock (one daemon per state folder).
"""
