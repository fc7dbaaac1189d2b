"""collabsim's engine: config validation, scenarios, data, models, the round loop, results, sweeps.

From Python: ``from sim import api`` (:mod:`sim.api`): ``api.compare(["fedavg"], rounds=5)``, ``api.run(...)``.
(Not re-exported here: ``sim.compare`` and ``sim.sweep`` are the commands' modules.)
"""

import warnings

# Arrays arriving through Ray's object store are read-only views; torch only reads them
# (training copies batches, set_state copies into parameters), so the warning is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
