"""`rmt-deploy demo`: the whole pipeline on an embedded default, offline, in minutes on a CPU.

May import every layer below the CLI: training, export, runtime, bench, basemodel, artifacts, errors.
"""
