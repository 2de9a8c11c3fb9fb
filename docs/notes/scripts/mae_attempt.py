"""Run ``minivfm.models.mae.results("cpu")`` with some fields of the cpu preset replaced.

    python docs/notes/scripts/mae_attempt.py '{"patch_size": 4, "max_epochs": 8, "finetune_epochs": 40}'

Used by docs/notes/mae_cpu_self_supervision.md. The ``stem`` field existed only at commit 83989b7
(``git checkout 83989b7`` to rerun the hMLP-stem attempt).
"""

import dataclasses
import json
import sys
import time

from minivfm.models import mae

cfg = dataclasses.replace(mae.MAEConfig.preset("cpu"), **json.loads(sys.argv[1]))
mae.MAEConfig.preset = classmethod(lambda cls, profile=None: cfg)
start = time.time()
out = mae.results("cpu")
print({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}, f"{time.time() - start:.0f} s")
