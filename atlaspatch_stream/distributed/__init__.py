"""Running across machines: SLURM-style shards (`plan`, `slurm`, `local`), node-local staging (`staging`) and the Ray
engine (`ray_engine`). Every node runs the unchanged pipeline; only the choice of slides is new.

Nothing heavy is imported here: `ray` is imported inside `ray_engine` functions, and only the CLI calls `ray.init`.
"""
