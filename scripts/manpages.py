"""Generate the man pages (docs/man/PROG.1) and shell completions (deploy/completion/) of the four
programs from their argparse definitions, or check that the committed ones are current.

    python scripts/manpages.py          # regenerate
    python scripts/manpages.py --check  # exit 1, naming the files, when a committed one is stale

Man pages come from argparse-manpage, completions (bash and zsh) from shtab: both read the same parsers
the programs use, so `--help`, the man page and the completion never disagree. `make test` runs the
check, so a changed option without regenerated files fails the build. Install them with
``install -m 644 docs/man/*.1 /usr/local/share/man/man1/`` and
``install -m 644 deploy/completion/*.bash /etc/bash_completion.d/``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "docs" / "man"
COMPLETION = ROOT / "deploy" / "completion"
#: Program -> the module whose `parser()` defines its command line.
PROGRAMS = {
    "standby-daemon": "standby.main",
    "standby-primary": "primary.main",
    "standbyctl": "standby.ctl",
    "standby-backup": "backupnode.main",
}
SUMMARIES = {
    "standby-daemon": "keep replicas of the primaries' volumes, snapshot them, export snapshots over NBD",
    "standby-primary": "export protected volumes over NBD and mirror every write to the standby",
    "standbyctl": "administer a standby daemon: status, snapshots, verify, failover and failback",
    "standby-backup": "back up snapshots to tape-friendly archives, restore, verify, list and prune them",
}


def files() -> dict[Path, str]:
    """Every generated file and its contents."""
    import shtab
    from argparse_manpage.manpage import Manpage

    from standbylib.runtime.main import package_version

    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines by the terminal's width
    out: dict[Path, str] = {}
    for prog, module in PROGRAMS.items():
        parser: argparse.ArgumentParser = importlib.import_module(module).parser()
        data = {
            "project_name": "standby-appliance",
            "version": package_version(),
            "description": SUMMARIES[prog],
            "url": "",
            "date": " ",  # none: the page must not change by the day it is made on
        }
        out[MAN / f"{prog}.1"] = str(Manpage(parser, _data=data))
        out[COMPLETION / f"{prog}.bash"] = shtab.complete(parser, shell="bash")
        out[COMPLETION / f"_{prog}"] = shtab.complete(parser, shell="zsh")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the committed files are current"
    )
    args = parser.parse_args()
    generated = files()
    if args.check:
        stale = [p for p, text in generated.items() if not p.exists() or p.read_text() != text]
        if stale:
            names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
            print(f"stale man pages or completions: {names}; run `make man`", file=sys.stderr)
            return 1
        return 0
    for path, text in generated.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"generated {len(generated)} files in docs/man and deploy/completion")
    return 0


if __name__ == "__main__":
    sys.exit(main())
