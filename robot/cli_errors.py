"""How every `reverie-robot` subcommand ends on an error: one readable line and an exit status, never a
traceback (the messages already name the port, servo, device or key)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

FAILED, INTERRUPTED = 2, 130


def run_guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                expected: tuple[type[BaseException], ...]) -> int:
    """Run `command(args)`; an `expected` error prints `reverie-robot CMD: message` and returns 2, Ctrl-C 130."""
    try:
        return command(args)
    except expected as exc:
        print(f"reverie-robot {args.command}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(f"reverie-robot {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
