"""``python -m sim.bench``: collabsim against plain single-process PyTorch doing the same work, in one run.

Prints numbers, asserts none: wall seconds (total, start-up, round loop, per round),
peak RSS of the whole process tree, and collabsim/plain ratios, for the workloads of
the performance issue (P: digits MLP, S: Synthetic(1,1) with 1,000 institutions, scale
runs at 1,000 and 10,000, the foundation local step, the default compare and,
with ``--sweep``, how well a smoke sweep packs the CPUs). ``measure`` says how times and
memory are taken, ``plain`` holds the baselines, ``workloads`` the sizes and runners.
"""
