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

from trainer import ConfigError, TrainConfig, Trainer, TrainingDiverged, load_config
from trainer.config import accepted, coerce


def _flag_type(spec: dataclasses.Field):
    """How a flag's text becomes the setting's value; argparse reports a refusal as a usage error."""

    def parse(text: str):
        try:
            return coerce(spec, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = spec.name  # argparse names the type in some messages
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line naming the flag and what it accepts (argparse would print the usage of every
        setting first)."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists every setting)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                     usage="%(prog)s [--config YAML] [--resume PATH] [--SETTING VALUE ...]",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings; flags win over it")
    parser.add_argument("--resume", metavar="PATH",
                        help="checkpoint to continue from, or 'auto': <out>/last.pt when there is one, "
                             "else a fresh start")
    for spec in dataclasses.fields(TrainConfig):
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        choices = spec.metadata["choices"]
        words = [spec.metadata["help"]]
        if not choices and not isinstance(default, str):
            words.append(accepted(spec))
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        parser.add_argument(f"--{spec.name.replace('_', '-')}", dest=spec.name, type=_flag_type(spec), default=None,
                            metavar="{" + ",".join(choices) + "}" if choices else "VALUE",
                            help=("; ".join(words) + (f" [{shown}]" if shown else "")).replace("%", "%%"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if key not in ("config", "resume")}
    try:
        config = load_config(args.config, overrides)
        trainer = Trainer(config, resume=args.resume)
    except (ConfigError, OSError) as error:  # settings, paths, files: one line, no traceback
        print(f"train_pose.py: error: {error}", file=sys.stderr)
        return 2
    try:
        metrics = trainer.fit()
    except TrainingDiverged as error:
        print(f"train_pose.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"train_pose.py: interrupted; {trainer.where_to_resume()}", file=sys.stderr)
        return 130
    finally:
        trainer.close()
    if metrics:
        print(" ".join(f"{key}={value:.4f}" for key, value in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
