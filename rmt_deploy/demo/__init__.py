"""`rmt-deploy demo`: the whole pipeline on an embedded default, offline, in minutes on a CPU."""
