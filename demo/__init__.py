"""End-to-end demo: a factory model learns a new user's motions on a simulated device (``python -m demo``)."""
