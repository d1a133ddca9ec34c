"""`reverie-keys`: make and inspect the CURVE key files that secure the robot <-> learner link.

    reverie-keys create NAME [--dir DIR]   write DIR/NAME.key (public) and DIR/NAME.key_secret
    reverie-keys show FILE                 print the Z85 public key held in FILE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.link.security import LinkSecurityError, create_keypair, load_key


class _UsageError(Exception):
    """argparse's complaint, turned into one line instead of usage text and an exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reverie-keys", description="CURVE key files for the robot <-> learner link.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    create = sub.add_parser("create", help="write NAME.key (public) and NAME.key_secret (secret) into --dir")
    create.add_argument("name", help="'learner' for the learner, the robot id for a robot")
    create.add_argument("--dir", type=Path, default=Path("keys"), help="directory for the key files (default: keys)")
    show = sub.add_parser("show", help="print the Z85 public key held in a key file")
    show.add_argument("file", type=Path)
    return parser


def _create(name: str, directory: Path) -> int:
    public_file, secret_file = create_keypair(directory, name)
    print(f"public key: {public_file}")
    print(f"secret key: {secret_file}  (mode 600; never copy it off this machine)")
    if name == "learner":
        print(f"learner: set link.server_secret: {secret_file}")
        print(f"robots:  copy {public_file} to each robot and set link.server_public to it")
    else:
        print(f"robot {name}: set link.client_secret: {secret_file}")
        print(f"learner: copy {public_file} into the learner's link.allow_dir (then restart the learner)")
    return 0


def _show(file: Path) -> int:
    public, _ = load_key(file, need_secret=False, what="key file")
    print(public.decode("ascii"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `reverie-keys`; returns the exit status (2 on any error, with one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "create":
            return _create(args.name, args.dir)
        return _show(args.file)
    except _UsageError as exc:
        print(f"reverie-keys: error: {exc} (see reverie-keys --help)", file=sys.stderr)
        return 2
    except LinkSecurityError as exc:
        print(f"reverie-keys: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
