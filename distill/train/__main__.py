"""`python -m distill.train` (how distill-pipeline starts its stages): the same app as `distill-train`.

The Hydra app lives in the importable module distill.train.cli, so that submitit (and the pool's loky) pickle
the job by reference: pickled by value, a job would never import it, and the module-level setup of
distill.tracking.cell_log (the cell log's propagate=False) would not run in it (every train.log line twice).
"""

from distill.train.cli import main

main()
