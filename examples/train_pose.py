"""Trains a top-down pose model with the hgloss losses and evaluates it with COCOeval or PCKh.

Every setting of trainer.TrainConfig (examples/trainer/config.py) is a flag (--batch-size 16, --lr-steps 170,200)
and can come from a YAML file (--config); flags win over the file. Examples::

    python examples/train_pose.py                                   # the synthetic set, hg+sd, CPU or GPU
    python examples/train_pose.py --config examples/configs/coco_simplebaseline_res50.yaml \\
        --train-images /data/coco/train2017 --val-images /data/coco/val2017
    python examples/train_pose.py --loss hg --grad-weight 2 --stencil sobel --out runs/hg
    python examples/train_pose.py --out runs/hg --resume auto        # continue where it stopped
    torchrun --nproc_per_node 2 examples/train_pose.py --config ...   # DistributedDataParallel

It prints progress bars and one line per evaluation, and writes config.yaml, log.jsonl,
last.pt, best.pt, metrics.json, curves.png and predictions.png to --out.
"""

import argparse
import dataclasses
import sys
import typing

from trainer import TrainConfig, Trainer, load_config


def _flag_type(annotation):
    """How a flag's text becomes the setting's value."""
    if annotation in (bool, "bool"):
        return lambda text: {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False,
                             "no": False, "off": False}[text.lower()]
    if typing.get_origin(annotation) is list or str(annotation).startswith("list"):
        inner = float if "float" in str(annotation) else int
        return lambda text: [inner(part) for part in text.split(",") if part]
    return {"int": int, "float": float, "str": str}.get(getattr(annotation, "__name__", str(annotation)), str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <out>/last.pt")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=_flag_type(hints[field.name]),
                            default=None, help=f"[{default}]")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if key not in ("config", "resume")}
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"train_pose.py: error: {error}", file=sys.stderr)
        return 2
    trainer = Trainer(config, resume=args.resume)
    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    if metrics:
        print(" ".join(f"{key}={value:.4f}" for key, value in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
