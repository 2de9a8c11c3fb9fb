"""The ``minivfm`` command.

Training goes through Lightning's ``LightningCLI``, so everything a Lightning
user expects works::

    minivfm fit --config configs/vit.yaml
    minivfm test --config configs/vit.yaml --ckpt_path runs/vit/version_0/checkpoints/last.ckpt
    minivfm fit --config configs/vit.yaml --print_config
    minivfm fit --config configs/vit.yaml --trainer.logger=WandbLogger --trainer.logger.offline=true

The course has three more commands, dispatched before Lightning sees the
arguments::

    minivfm course build [--check]      # lessons/ from solutions/
    minivfm grade SUBMISSION.ipynb ...  # grade notebooks against solutions/
    minivfm results [MODEL ...]         # train, evaluate, print README rows
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from minivfm.profiles import configure_threads

COURSE_COMMANDS = {
    "course": "minivfm course build [--check]: write lessons/ from solutions/",
    "grade": "minivfm grade SUBMISSION.ipynb [...]: grade notebooks against the reference solutions",
    "results": "minivfm results [MODEL ...]: train and evaluate models, print the README results rows",
}

DESCRIPTION = (
    "minivfm: visual foundation models rebuilt from scratch. Lightning subcommands below; "
    "course commands: " + "; ".join(COURSE_COMMANDS.values())
)


def _course(argv: list[str]) -> int:
    from minivfm.course import build

    if not argv or argv[0] != "build":
        print("usage: minivfm course build [--check] [options]", file=sys.stderr)
        return 2
    return build.main(argv[1:])


def _grade(argv: list[str]) -> int:
    from minivfm.course import grade

    return grade.main(argv)


def _results(argv: list[str]) -> int:
    from minivfm import results

    return results.main(argv)


def _lightning_cli(argv: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    class MiniVFMCLI(LightningCLI):
        """LightningCLI that takes epochs from the model's profile preset and, after ``fit``,
        tests the trained model and draws figures."""

        def instantiate_trainer(self, **kwargs):
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            epochs = getattr(self.model, "hparams", {}).get("max_epochs")
            unset = trainer_cfg.get("max_epochs") is None and trainer_cfg.get("max_steps", -1) in (None, -1)
            if epochs and unset and "max_epochs" not in kwargs:
                kwargs["max_epochs"] = int(epochs)
            return super().instantiate_trainer(**kwargs)

        def after_fit(self) -> None:
            trainer, model = self.trainer, self.model
            if getattr(trainer, "fast_dev_run", False) or not trainer.is_global_zero and trainer.world_size > 1:
                return
            dm = self.datamodule
            # the final weights, as `minivfm results` measures them (the best-on-validation checkpoint is saved too)
            results = trainer.test(model, datamodule=dm, verbose=False) if dm is not None else []
            for key, value in (results[0] if results else {}).items():
                print(f"{key} = {value:.4f}")
            if trainer.is_global_zero:
                _write_figures(trainer, model, dm)

    MiniVFMCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs"},
            },
        },
        parser_kwargs={"description": DESCRIPTION},
        args=argv,
    )


def _write_figures(trainer, model, datamodule) -> None:
    """Training curves and, for classifiers, a grid of test predictions, into the log dir."""
    import torch

    from minivfm import viz

    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    written = []
    metrics_csv = log_dir / "metrics.csv"
    if metrics_csv.exists():
        try:
            fig = viz.training_curves(metrics_csv, path=log_dir / "curves.png")
            written.append(log_dir / "curves.png")
            fig.clf()
        except ValueError:
            pass
    if datamodule is not None and getattr(model, "hparams", {}).get("num_classes"):
        batch = next(iter(datamodule.test_dataloader()))
        images, labels = batch["image"][:32], batch["label"][:32]
        model.eval()
        with torch.no_grad():
            pred = model(images.to(model.device)).argmax(-1).cpu()
        names = list(getattr(datamodule, "class_names", None) or range(int(model.hparams["num_classes"])))
        titles = [str(names[int(p)]) for p in pred]
        colors = ["green" if p == t else "red" for p, t in zip(pred.tolist(), labels.tolist())]
        viz.image_grid(
            images, nrow=8, titles=titles, title_colors=colors, path=log_dir / "predictions.png",
            title=f"test predictions (red = wrong), {int((pred == labels).sum())}/{len(labels)} correct",
        ).clf()
        written.append(log_dir / "predictions.png")
    ckpts = sorted(log_dir.glob("checkpoints/*.ckpt"))
    for path in ckpts + written:
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # wandb is optional and offline unless the user says otherwise; it never asks for a login.
    os.environ.setdefault("WANDB_MODE", "offline")
    if argv and argv[0] in COURSE_COMMANDS:
        if argv[0] == "results":
            configure_threads()
        handler = {"course": _course, "grade": _grade, "results": _results}[argv[0]]
        return handler(argv[1:])
    if not any(a in ("-h", "--help") or a.startswith("--print_config") for a in argv):
        configure_threads()
    _lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
