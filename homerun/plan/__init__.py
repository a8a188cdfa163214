"""Plan: model specs (config.json, shipped cards), byte inventories, the pure planner with its placement search,
and hardware detection (`--hw auto`). The planner is a pure function: specs, inventory and a hardware profile in,
a Plan with a reason per decision out.

May import: homerun.errors, homerun.formats, homerun.kernels (hardware detection only: which CPU kernel path is
built, the measured read bandwidth), homerun.models (torch-free formulas only: homerun.models.decode_bytes, the
decode graphs' static state that graph_memory charges), profiles.
"""
