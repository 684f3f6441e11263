"""Finite job sources: path lists (`discover`), SLURM-style shards with stealing (`shards`, `shard_feed`, `slurm`),
and node-local copies of slides before they are read (`local_copy`, the `--stage-dir` option)."""
