"""On-disk formats and their checks, numpy only: what export writes and the runtime reads.

masks (the mask codec), heads (task head math), task_file (one task: `.rmtask`), manifest
(the bundle's versioned schema), bundle (the bundle directory), integrity (confined paths,
sizes, sha256), safetensors_header (a bounded header reader), staging (atomic files and
folders), fingerprint (the base fingerprint), tensorrt_files (engine file names).
May import: rmt_deploy.errors only. Never torch, open_clip or onnx.
"""
