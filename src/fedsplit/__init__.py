"""fedsplit: federated split learning and inference of large language models."""

import os as _os

__version__ = "0.1.0"

# OpenMP worker threads that finish a parallel region keep spinning for a while before they
# sleep (libgomp's default: 300,000 spins, about 6 ms here). Between the layers of one forward
# that keeps them hot; but client and server take turns (head, body, tail), and a process
# waiting for the other one spins on a core the other one needs, which cost split generation
# on a shared 2-core machine about 10 ms per token. 20,000 spins (about 0.4 ms) still bridge
# the gaps between the operators of a forward (the unsplit model is not slower, measured in
# docs/benchmarks.md). Set before torch loads its OpenMP runtime, which reads it once; a
# user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins, and importing torch before fedsplit
# keeps OpenMP's default.
if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "20000"
