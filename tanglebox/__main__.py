"""Manage API tokens: ``python -m tanglebox tokens add|list|revoke``.

    python -m tanglebox tokens add NAME [--settings PATH] [--hashed]   # prints only the token
    python -m tanglebox tokens list [--settings PATH]                  # NAME<TAB>plain|sha256
    python -m tanglebox tokens revoke NAME [--settings PATH]

The token file is the ``apiTokensFile`` setting (default ``apiTokens.txt``), relative to the
settings file; a running server picks up every change without a restart. ``add`` prints
nothing but the token on stdout, so ``TOKEN=$(python -m tanglebox tokens add ci)`` works; with
``--hashed`` the file keeps only its SHA-256 and the printed token cannot be shown again.
A mistake is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tanglebox.api_tokens import TokenFileError, add_token, list_tokens, revoke_token
from tanglebox.settings import SettingsError, load_settings

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(USAGE_ERROR, f"tanglebox: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tanglebox", description="Tanglebox administration.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    tokens = commands.add_parser("tokens", help="manage API tokens (the apiTokensFile setting)")
    actions = tokens.add_subparsers(dest="action", required=True, parser_class=_Parser)
    settings_help = "settings file whose apiTokensFile to use (default: settings.json)"

    add = actions.add_parser("add", help="create a token for NAME and print it")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--hashed", action="store_true",
                     help="store only the token's SHA-256 in the file")
    add.add_argument("--settings", default=None, metavar="PATH", help=settings_help)

    show = actions.add_parser("list", help="list token names and how each is stored")
    show.add_argument("--settings", default=None, metavar="PATH", help=settings_help)

    revoke = actions.add_parser("revoke", help="delete NAME's token")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--settings", default=None, metavar="PATH", help=settings_help)
    return parser


def token_file_path(settings_path: str | None) -> Path:
    """The token file named by the settings; a --settings PATH that does not exist is an error
    (a typo must not create a stray token file), a missing default settings.json is not."""
    if settings_path is not None and not Path(settings_path).is_file():
        raise SettingsError(f"{settings_path}: no such settings file")
    # write_missing=False: managing tokens must not create or rewrite settings.json.
    settings = load_settings(settings_path or "settings.json", write_missing=False)
    return settings.relative_path(settings["apiTokensFile"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = token_file_path(args.settings)
        if args.action == "add":
            token = add_token(path, args.name, hashed=args.hashed)
            print(token)
        elif args.action == "list":
            for entry in list_tokens(path):
                print(f"{entry.name}\t{'sha256' if entry.hashed else 'plain'}")
        elif args.action == "revoke":
            revoke_token(path, args.name)
            print(f"tanglebox: revoked the token of \"{args.name}\" in {path}", file=sys.stderr)
    except (SettingsError, TokenFileError) as err:
        print(f"tanglebox: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:
        print(f"tanglebox: error: {err.filename or 'the token file'}: {err.strerror}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
