"""The GPU check kit's checks (benchmarks/gpu/checks.py runs each in its own process).

Each check module has `run(ctx) -> dict` returning {"status": "pass"|"fail"|"skipped",
"reason": str, "figures": dict}. With ctx.device == "cpu" (a dry run) a check runs its
CPU part on a tiny model, or says that it has none; the driver then records the check as
"skipped: no CUDA device" with that CPU part under figures["cpu_part"].
"""
CHECKS = ("cuda_tests", "train_step", "torch_switch", "ort_cuda", "tensorrt")
