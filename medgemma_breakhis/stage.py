"""The start every stage script shares, so the six stages cannot drift apart in how they begin."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from medgemma_breakhis.logs import configure_logging
from medgemma_breakhis.params import Params, add_override_argument, load_params
from medgemma_breakhis.signals import interrupt_on_sigterm, stop_when_dvc_exits


def start_stage(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Params]:
    """Parse the stage's arguments and its `-S key=value` overrides, set up logging, make SIGTERM unwind like Ctrl-C
    (and the loss of the dvc that runs the stage like SIGTERM), and load the validated params: a bad param fails
    here, before any data or model is touched."""
    add_override_argument(parser)
    args = parser.parse_args(argv)
    configure_logging()
    interrupt_on_sigterm()
    stop_when_dvc_exits()
    return args, load_params(overrides=args.overrides)
