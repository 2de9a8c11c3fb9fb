"""One CLIP attempt of docs/notes/clip_cpu_zeroshot.md, or its supervised setup check.

    python docs/notes/scripts/clip_attempt.py '{"num_train": 24000, "max_epochs": 12}'
    python docs/notes/scripts/clip_attempt.py --supervised

The first trains CLIPConfig.preset("cpu") with the JSON fields replaced and prints the zero-shot
accuracy (all test scenes, held-out and one-shape ones) and recall@1; the second trains lesson 04's
ViT with labels at CLIP's budget (the same image encoder, pairs, epochs and batch size).
"""

import json
import sys
import time
from dataclasses import replace

from minivfm.models.clip import CLIPConfig, evaluate, shapes_pairs, train
from minivfm.models.vit import ViTConfig
from minivfm.models.vit import train as train_vit

cfg = CLIPConfig.preset("cpu")
start = time.perf_counter()
if sys.argv[1:] == ["--supervised"]:
    vit = replace(
        ViTConfig.preset("cpu"), num_train=cfg.num_train, max_epochs=cfg.max_epochs, batch_size=cfg.batch_size
    )
    print("supervised at CLIP's budget:", train_vit(vit)[1])
else:
    cfg = replace(cfg, **json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
    model = train(cfg, "cpu").model
    print(cfg, evaluate(model, shapes_pairs(cfg.num_test, seed=2), shapes_pairs(cfg.num_retrieval, seed=3)))
print(f"{time.perf_counter() - start:.0f} s")
