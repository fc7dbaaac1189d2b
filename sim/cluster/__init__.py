"""The warm local Ray cluster and the node-failure rehearsal: commands around :mod:`agents.runtime.cluster`.

``python -m sim.cluster up`` / ``down`` / ``status`` keep a local Ray cluster up between commands
(see docs/how-to/cluster.md); ``python -m sim.cluster.rehearse`` loses a node mid-run on a local
multi-node cluster and checks the run stops with its resume command and resumes to the same numbers.
"""
