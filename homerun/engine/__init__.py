"""Engine: `load(path) -> Model`, `Model.session() -> Session`, generation and sampling, the expert-backend
choice, and the placement executor that puts a plan's layers, KV and expert caches on devices.

May import: homerun.errors, homerun.formats, homerun.kernels, homerun.models, profiles, homerun.plan, offload.
"""
