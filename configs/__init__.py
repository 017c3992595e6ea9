"""The shipped training configs (installed as `sdjax.configs`): the one source of training defaults.

`sdjax train STAGE --config NAME` takes one of these by name (`shapes_ldm`), or any file with `get_config()`.
"""
