"""Multi-process training goes through Lightning's strategies; test DDP on CPU with two processes."""

import lightning as L
import pytest
import torch

from minivfm.data import ShapesDataModule
from minivfm.models.vit import ViTClassifier


@pytest.mark.slow
def test_vit_trains_with_ddp_on_two_cpu_processes(tmp_path):
    L.seed_everything(0)
    data = ShapesDataModule(batch_size=16, num_train=128, num_val=32, num_test=32)
    model = ViTClassifier(
        image_size=32, patch_size=8, in_chans=3, num_classes=data.num_classes, embed_dim=32, depth=1, num_heads=2
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    # ddp_spawn copies the trained weights of rank 0 back into this process.
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed: the two processes did not train"
    assert trainer.world_size == 2
