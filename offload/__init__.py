"""Offload: the host expert store, the device expert cache and its policies, transfers, prefetch, the miss policy,
devices with budgets, and routing traces. It plugs into the engine by composition (an ExpertBackend).

May import: homerun.errors, homerun.formats, homerun.kernels.
"""
