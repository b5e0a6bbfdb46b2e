"""`dpokit <command> [--config FILE.yaml] [key=value ...]`: parses the command line and calls the
command's function (the same function as `dpokit.<name>()` in Python) with the config it read.

A UserError (bad data, bad config) becomes one line `error: ...` and exit code 2, with no traceback.
"""

import importlib
import os
import sys

from dpokit.commands import COMMANDS
from dpokit.config import help_text, load_config
from dpokit.errors import Interrupted, UserError
from dpokit.report import setup_logging


def command(name: str):
    """(config class, function) of a command, importing its module."""
    module, cls, fn, _ = COMMANDS[name]
    module = importlib.import_module(module)
    return getattr(module, cls), getattr(module, fn)


def config_class(name: str):
    return command(name)[0]


def usage() -> str:
    lines = ["usage: dpokit <command> [--config FILE.yaml] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, _, _, doc) in COMMANDS.items()]
    lines += ["", "`dpokit <command> --help` lists every key."]
    return "\n".join(lines)


def parse(argv):
    config_file, overrides = None, []
    it = iter(argv)
    for a in it:
        if a in ("--config", "-c"):
            config_file = next(it, None)
            if config_file is None:
                raise UserError("--config needs a file")
        elif a.startswith("--config="):
            config_file = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise UserError(f"unknown option '{a}' (keys are given as key=value)")
        else:
            overrides.append(a)
    return config_file, overrides


def main(argv=None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `dpokit --help | head`: the reader left early, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (and no second one at exit)
        return 0


def run(argv) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}' (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(help_text(config_class(name), name))
        return 0
    setup_logging()
    try:
        cls, fn = command(name)
        fn(load_config(cls, *parse(rest)))
        from dpokit.train.runtime import finish_distributed  # (torch is loaded by now; --help stays light)

        finish_distributed()  # the process ends here: every torchrun rank leaves together
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"dpokit: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
