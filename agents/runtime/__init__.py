"""Where the domain meets Ray: backends (in-process and Ray actors), the cluster, placement, warm actors, Ray Train.

The only modules of the domain that import Ray (besides the Tune entry, sim.sweep); schemes, institutions and the
coordinator never import this package (pyproject.toml's import contracts).
"""
