"""The Ray engine (`ray_engine`): one pipeline per worker actor, driven by the run layer.

Nothing heavy is imported here: `ray` is imported inside `ray_engine` functions, and only the CLI calls `ray.init`.
"""
