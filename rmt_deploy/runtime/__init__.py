"""Runtime: serve many tasks from one shared base (`Engine`), numpy + a backend.

engine (the public API), task_reader (a task file to its head and compact masks), task_tiers
(resident / warm / cold / on disk, lazily read), buffer_pool (the dense buffers the backend is
fed and their in-place rewrites), baseweights (the base values), preprocess (one image path:
decode, RGB, resize, crop, normalise), backends/ (onnxruntime, tensorrt, torch).
May import: rmt_deploy.artifacts, rmt_deploy.errors, and in the torch backend alone
rmt_deploy.basemodel. No torch outside backends/torch.py; importing this package loads
nothing heavy, backends import their libraries lazily.
"""
