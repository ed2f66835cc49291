"""Prepare and inspect decoders.

deliberate model prepare            convert the bundled SmolLM2-135M-Instruct (GGUF) into a
                                    bf16 Hugging Face folder in the cache; prints its path
                                    and decoder fingerprint
deliberate model fingerprint PATH   print the decoder fingerprint of any HF model folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deliberate.commands import add_settings_flags, settings_from_args

HELP = "prepare the bundled decoder; print fingerprints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    prepare = actions.add_parser("prepare", help="convert the bundled decoder (idempotent)")
    prepare.add_argument("--force", action="store_true", help="convert again even if present")
    add_settings_flags(prepare, "cache_dir")
    fingerprint = actions.add_parser("fingerprint", help="decoder fingerprint of a model folder")
    fingerprint.add_argument("path", type=Path)


def run(args: argparse.Namespace) -> int:
    from cache_store.fingerprint import decoder_fingerprint

    if args.action == "fingerprint":
        print(decoder_fingerprint(args.path))
        return 0
    from deliberate.models import prepare_bundled_decoder

    settings = settings_from_args(args)
    path = prepare_bundled_decoder(settings.cache_dir, force=args.force)
    print(f"path: {path}")
    print(f"decoder fingerprint: {decoder_fingerprint(path)}")
    return 0
