"""The evaluation tests run offline: local task YAMLs (tasks/) whose data are JSON lines beside
them, read by the tasks' own `custom_dataset` loader; the hub is never asked."""
from __future__ import annotations

import os

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
os.environ.update(OFFLINE)
