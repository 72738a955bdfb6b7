"""The `pgvault` console script: the per-segment fast paths first, then the click CLI.

PostgreSQL runs archive_command and restore_command once per WAL segment. When the look-ahead of
an earlier wal-push already put a segment in the repository, or a prefetch already fetched it, the
answer needs neither click nor pydantic nor boto3: this module parses just those command lines
(standard library only) and lets pgvault.push_ahead / pgvault.prefetch answer. So does removing the
prefetch spool when recovery ends (recovery_end_command, which PostgreSQL waits for). Anything they do
not answer for certain, and every other command, goes to pgvault.cli.main.
"""

from __future__ import annotations

import os
import sys


def parse_fast(argv: list[str]) -> tuple[str, str, list[str], bool] | None:
    """(config path, command, arguments, quiet) of `[--config FILE | --config=FILE] [-q] wal-push|wal-fetch
    ARGS` or `... wal-prefetch --clean`; None for anything else (the CLI then parses it, with its errors)."""
    config = os.environ.get("PGVAULT_CONFIG")
    quiet = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            config, i = arg.split("=", 1)[1], i + 1
        elif arg in ("-q", "--quiet"):
            quiet, i = True, i + 1
        else:
            break
    if i >= len(argv) or not config:
        return None
    command, args = argv[i], argv[i + 1:]
    if command == "wal-prefetch":
        return (config, command, args, quiet) if args == ["--clean"] else None
    if command not in ("wal-push", "wal-fetch") or any(a.startswith("-") for a in args):
        return None
    return config, command, args, quiet


def main() -> None:
    parsed = parse_fast(sys.argv[1:])
    if parsed is not None:
        config, command, args, quiet = parsed
        code: int | None = None
        try:
            if command == "wal-push":
                from pgvault.push_ahead import fast_push

                code = fast_push(config, args)
            elif command == "wal-fetch":
                from pgvault.prefetch import fast_fetch

                code = fast_fetch(config, args)
            else:
                from pgvault.prefetch import fast_clean

                code = fast_clean(config, quiet)
        except ImportError:
            code = None
        except Exception:  # the fast path only ever answers for certain; the full path decides
            code = None
        if code is not None:
            sys.exit(code)
    from pgvault.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
