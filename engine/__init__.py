"""callsentry's runtime: receive, decode, store, track, detect, alert."""

import os

# The models' numbers are small vectors: OpenBLAS's worker threads (numpy's and
# scipy's, imported under river) do no useful work here, yet spin on the same
# cores as detection and the lake writer after each call. One thread unless the
# operator says otherwise; this must be set before anything imports numpy, and every
# entry point imports `engine` first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
