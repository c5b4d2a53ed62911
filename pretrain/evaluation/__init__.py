"""Downstream evaluation with lm-evaluation-harness: the `evaluation` config section (config.py),
ebb's model as an lm-eval `LM` (lm.py), finding, loading and running tasks (tasks.py) and their run
during training (loop.py). Only config.py is imported by a run without tasks; lm-eval is an
optional dependency (`pip install -e .[eval]`)."""
