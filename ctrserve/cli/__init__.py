"""The `ctrserve` command line: the parser and dispatch (parser.py), the commands (commands.py)
and the demo (demo.py). It sits above every other layer and nothing below imports it."""

from ctrserve.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
