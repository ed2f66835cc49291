"""Train a coprocessor (or the pause-token baseline) for a frozen decoder.

  deliberate train --out /work/runs/copro                 # LoRA coprocessor, bundled prose
  deliberate train --out /work/runs/pause --method pause  # the pause-token baseline
  deliberate train --out RUN --corpus notes/ data.jsonl   # a user's corpus (.txt, .jsonl)
  deliberate train --out RUN                              # again: resumes from RUN/last

Packed multi-position training (K positions per window share one prefix pass; 4D attention
mask), decoder frozen, LM loss on the N_A ahead tokens. Writes RUN/log.jsonl, RUN/last/
(resumable) and RUN/best/ (a checkpoint folder, best held-out loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from deliberate.commands import add_settings_flags, settings_from_args

HELP = "train a coprocessor or pause-token baseline (packed, resumable)"


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per dataclass field (`--n-latents`, ...), defaulting to the field's default,
    with the help text of its `Annotated` type."""
    group = parser.add_argument_group("training hyper-parameters")
    hints = typing.get_type_hints(config_cls, include_extras=True)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        hint, about = hints[f.name], ""
        if typing.get_origin(hint) is typing.Annotated:
            hint, about = typing.get_args(hint)[:2]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if typing.get_origin(hint) is typing.Literal:
            group.add_argument(
                flag,
                choices=typing.get_args(hint),
                default=default,
                help=f"{about} (default: {default})",
            )
        elif typing.get_origin(hint) is list:
            choices = f.metadata.get("choices")
            group.add_argument(
                flag,
                nargs="+",
                default=default,
                choices=choices,
                metavar=None if choices else "PATH",
                help=f"{about} (default: {' '.join(default)})" if default else about,
            )
        elif hint is bool:
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{about} (default: {default})",
            )
        else:
            group.add_argument(
                flag, type=hint, default=default, help=f"{about} (default: {default!r})"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coprocessor_worker.train_config import TrainConfig

    parser.add_argument("--out", type=Path, required=True, help="run folder (created/resumed)")
    parser.add_argument("--no-resume", action="store_true", help="ignore OUT/last, start over")
    add_config_flags(parser, TrainConfig)
    add_settings_flags(parser, "cache_dir", "model")


def run(args: argparse.Namespace) -> int:
    from coprocessor_worker.train import train
    from coprocessor_worker.train_config import TrainConfig
    from deliberate.models import resolve_decoder

    settings = settings_from_args(args)
    decoder = resolve_decoder(Path(settings.model) if settings.model else None, settings.cache_dir)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    best = train(cfg, decoder, args.out, resume=not args.no_resume)
    print(f"best checkpoint: {best}")
    return 0
