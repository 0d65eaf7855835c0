"""unionrun's manual pages and bash completion, generated from its argument parser (cli.py):
a page per command by argparse-manpage (unionrun.1, unionrun-run.1, ...), the completion script
by shtab. scripts/setup.sh installs both:

    python -m unionfs.launcher.docs --man-dir /usr/local/share/man/man1 \\
        --bash-completion /usr/share/bash-completion/completions/unionrun
"""

from __future__ import annotations

import argparse
import os
import sys

MANUAL = "unionrun manual"


def _subcommands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    return [(name, p, helps.get(name)) for name, p in sub.choices.items()]


def _page(parser, name, description):
    from argparse_manpage.manpage import Manpage
    from . import verbs
    page = Manpage(parser)
    # The page's name as man finds it (unionrun-run), not the program's words (unionrun run).
    page.prog, page.description = name, description
    page.source, page.manual = f"unionfs {verbs.version()}", MANUAL
    return str(page)


def pages(parser):
    """{file name: roff text}: unionrun.1 and unionrun-CMD.1 for each sub-command (its own
    sub-commands, as network's and volume's, on its page)."""
    out = {"unionrun.1": _page(parser, "unionrun", parser.description)}
    for name, sub, help_ in _subcommands(parser):
        out[f"unionrun-{name}.1"] = _page(sub, f"unionrun-{name}", help_)
    return out


def completion(parser):
    import shtab
    return shtab.complete(parser, shell="bash")


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def main(argv=None):
    from . import cli
    ap = argparse.ArgumentParser(prog="python -m unionfs.launcher.docs",
                                 description="write unionrun's man pages and bash completion")
    ap.add_argument("--man-dir", metavar="DIR", help="write unionrun*.1 here")
    ap.add_argument("--bash-completion", metavar="FILE", help="write the bash completion here")
    args = ap.parse_args(argv)
    parser = cli._parser()
    if args.man_dir:
        os.makedirs(args.man_dir, exist_ok=True)
        for name, text in pages(parser).items():
            _write(os.path.join(args.man_dir, name), text)
    if args.bash_completion:
        os.makedirs(os.path.dirname(os.path.abspath(args.bash_completion)), exist_ok=True)
        _write(args.bash_completion, completion(parser))
    return 0


if __name__ == "__main__":
    sys.exit(main())
