"""Chaos harness: real faults against the real stack (Temporal dev server, worker process,
qemu-nbd, nbdkit, loop-mounted filesystems), then a hunt for anything left behind.

``python -m chaos.run [--short] [--runs N] [--seed S] [--json PATH]`` runs every scenario
in turn on one private stack; see ``chaos/run.py`` for the scenarios and their expected
outcomes, and ``chaos/harness.py`` for the fault tools and the leak checks.
"""
