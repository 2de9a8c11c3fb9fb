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


def _cli_class():
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.utilities.model_helpers import is_overridden

    class MiniVFMCLI(LightningCLI):
        """LightningCLI that links the data's sizes into the model, takes epochs or steps from the
        model's preset and, after ``fit``, tests the trained model and draws the figures that suit it."""

        def add_arguments_to_parser(self, parser) -> None:
            # every DataModule knows these right after __init__; a model that lacks one ignores it
            for source, target in LINKS:
                parser.link_arguments(source, f"model.init_args.{target}", apply_on="instantiate")

        def instantiate_trainer(self, **kwargs):
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            hparams = getattr(self.model, "hparams", {})
            unset = trainer_cfg.get("max_epochs") is None and trainer_cfg.get("max_steps", -1) in (None, -1)
            if unset and "max_epochs" not in kwargs and "max_steps" not in kwargs:
                if hparams.get("max_steps"):  # models that train by optimizer steps (the DDPM)
                    kwargs.update(max_steps=int(hparams["max_steps"]), max_epochs=-1)
                elif hparams.get("max_epochs"):
                    kwargs["max_epochs"] = int(hparams["max_epochs"])
            return super().instantiate_trainer(**kwargs)

        def after_fit(self) -> None:
            trainer, model = self.trainer, self.model
            if getattr(trainer, "fast_dev_run", False) or not trainer.is_global_zero and trainer.world_size > 1:
                return
            dm = self.datamodule
            # the final weights, as `minivfm results` measures them (the best-on-validation checkpoint is saved too)
            if dm is not None and is_overridden("test_step", model):
                for key, value in (trainer.test(model, datamodule=dm, verbose=False) or [{}])[0].items():
                    print(f"{key} = {value:.4f}")
            if trainer.is_global_zero:
                _write_figures(trainer, model, dm)

    return MiniVFMCLI


# (DataModule property, model argument); the ViT keeps timm's name for its channels
LINKS = (
    ("data.num_classes", "num_classes"),
    ("data.in_channels", "in_channels"),
    ("data.in_channels", "in_chans"),
    ("data.image_size", "image_size"),
)


def _cli_kwargs(argv: list[str], **kw) -> dict:
    return dict(
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
        **kw,
    )


def _lightning_cli(argv: list[str]) -> None:
    import warnings

    # `minivfm` hands LightningCLI its own arguments on purpose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    _cli_class()(**_cli_kwargs(argv))


def _print_resolved_config(argv: list[str]) -> None:
    """``--print_config``, with the values that will be used: the model's arguments filled in from
    its preset and the linked data sizes, the trainer's epochs or steps, the DataModule's sizes."""
    import warnings

    import yaml

    args = [a for a in argv if not a.startswith("--print_config")]
    if args and not args[0].startswith("-"):
        args = args[1:]  # the subcommand: instantiate without running it
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = _cli_class()(**_cli_kwargs(args, run=False))
    config = cli.parser.dump(cli.config, format="yaml", skip_none=False, skip_validation=True)
    config = yaml.safe_load(config)
    hparams = {k: v for k, v in dict(cli.model.hparams).items() if not k.startswith("_")}
    config["model"]["init_args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in hparams.items()}
    trainer = cli.trainer
    config["trainer"]["max_epochs"] = trainer.max_epochs
    config["trainer"]["max_steps"] = trainer.max_steps
    if cli.datamodule is not None and "data" in config:
        init = config["data"].setdefault("init_args", {})
        for key in list(init):
            value = getattr(cli.datamodule, key, None)
            if init[key] is None and value is not None:
                init[key] = value
    print(yaml.safe_dump(config, sort_keys=False), end="")


def _write_figures(trainer, model, datamodule) -> None:
    """Training curves and what suits the model, into the log dir: samples and their metrics for
    generators, reconstructions for autoencoders, a grid of test predictions for classifiers."""
    import torch

    from minivfm import viz

    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    written = []

    def save(fig, name: str) -> None:
        viz.save_figure(fig, log_dir / name)
        fig.clf()
        written.append(log_dir / name)

    metrics_csv = log_dir / "metrics.csv"
    if metrics_csv.exists():
        try:
            save(viz.training_curves(metrics_csv), "curves.png")
        except ValueError:
            pass
    model.eval()
    hparams = getattr(model, "hparams", {})
    names = list(getattr(datamodule, "class_names", None) or [])
    batch = next(iter(datamodule.test_dataloader())) if datamodule is not None else None
    if hasattr(model, "generate"):
        generator = torch.Generator(device=model.device).manual_seed(0)
        with torch.no_grad():
            images, labels = model.generate(int(hparams.get("num_samples") or 256), generator=generator)
        _print_sample_metrics(images, labels)
        shown = images[:64]
        titles = [str(names[int(k)]) for k in labels[:64]] if labels is not None and names else None
        save(viz.image_grid(shown, nrow=8, titles=titles, title=f"{type(model).__name__} samples"), "samples.png")
    if batch is not None and hasattr(getattr(model, "model", None), "reconstruct"):
        x = batch["image"][:16].to(model.device)
        with torch.no_grad():
            rec = model.model.reconstruct(x).cpu()
        grid = torch.cat([x.cpu(), rec])
        save(viz.image_grid(grid, nrow=16, title="test images (top) and their reconstructions"), "reconstructions.png")
    if batch is not None and hparams.get("num_classes") and not hasattr(model, "generate"):
        images, labels = batch["image"][:32], batch["label"][:32]
        with torch.no_grad():
            pred = model(images.to(model.device)).argmax(-1).cpu()
        names = names or list(range(int(hparams["num_classes"])))
        titles = [str(names[int(p)]) for p in pred]
        colors = ["green" if p == t else "red" for p, t in zip(pred.tolist(), labels.tolist())]
        fig = viz.image_grid(
            images, nrow=8, titles=titles, title_colors=colors,
            title=f"test predictions (red = wrong), {int((pred == labels).sum())}/{len(labels)} correct",
        )  # fmt: skip
        save(fig, "predictions.png")
    ckpts = sorted(log_dir.glob("checkpoints/*.ckpt"))
    for path in ckpts + written:
        print(f"wrote {path}")


def _print_sample_metrics(images, labels) -> None:
    """``sample_fd`` (and, for class-conditional samples, ``sample_acc``) of generated Shapes images."""
    from minivfm import metrics

    if images.shape[1:] != (3, metrics.IMAGE_SIZE, metrics.IMAGE_SIZE):
        print(f"no sample metrics: they score 3x{metrics.IMAGE_SIZE}x{metrics.IMAGE_SIZE} Shapes images")
        return
    print(f"sample_fd = {metrics.sample_fd(images):.4f}  ({len(images)} samples against real test images)")
    if labels is not None:
        print(f"sample_acc = {metrics.sample_acc(images, labels):.4f}")


def main(argv: Sequence[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # wandb is optional and offline unless the user says otherwise; it never asks for a login.
    os.environ.setdefault("WANDB_MODE", "offline")
    if argv and argv[0] in COURSE_COMMANDS:
        if argv[0] == "results":
            configure_threads()
        handler = {"course": _course, "grade": _grade, "results": _results}[argv[0]]
        return handler(argv[1:])
    if any(a.startswith("--print_config") for a in argv) and not any(a in ("-h", "--help") for a in argv):
        _print_resolved_config(argv)
        return 0
    if not any(a in ("-h", "--help") for a in argv):
        configure_threads()
    _lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
