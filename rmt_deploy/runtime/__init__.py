"""Runtime: serve many tasks from one shared base (`Engine`), numpy + a backend.

Importing this package loads nothing heavy; backends import their libraries lazily.
"""
