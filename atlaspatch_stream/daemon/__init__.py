"""The folder service (`atlaspatch watch`, `serve_folder`): the watcher and its completeness checks, output naming,
the clock, the ledger (states, store, facade) and operations (status file, metrics, sd_notify, logs, pseudonyms).

Nothing is imported here: `import atlaspatch_stream.daemon.service` for `serve_folder`.
"""
