"""The ``dinomed`` command line: ``dinomed segment|features|pretrain|finetune|evaluate|demo|…``.

Each subcommand lives in ``dinomed/commands/<name>.py`` and defines ``register(subparsers)``, which adds its
parser and sets ``func`` to a function taking the parsed arguments and returning an exit status. Heavy
imports (torch, SimpleITK) happen inside those functions so that ``dinomed --help`` stays fast.

A :class:`~dinomed.errors.DinomedError` is printed as one line ``dinomed <cmd>: error: …`` (and as an
``error`` event with ``--events``) and the command exits with status 2; no traceback for bad input.
``dinomed finetune|pretrain`` exit with status 3 (:data:`~dinomed.errors.EXIT_STOPPED`) when they stopped before
their end with a checkpoint saved (SIGTERM/SIGINT, or ``train.stop_after``); ``--resume`` continues them.

SIGTERM (what a GUI Cancel sends first) and SIGINT (Ctrl-C) stop every command except ``finetune`` and
``pretrain`` (which save a checkpoint on a stop and handle the signals themselves) with the temporary files of
unfinished atomic writes removed: exit status 143 after SIGTERM, 130 after SIGINT.

SIGUSR1 (POSIX, when run as a program) prints every thread's Python stack to stderr and the command goes on
(:mod:`faulthandler`): ``kill -USR1 PID`` shows where a job that looks stuck is; the front-ends' job runner
sends it with ``Job.dump_stacks()`` and shows the stacks in the job's log.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import DinomedError

EXIT_SIGTERM = 143  # 128 + SIGTERM, the shell's convention
EXIT_SIGINT = 130  # 128 + SIGINT
# Commands that install their own stop handling (checkpoint on stop); main() leaves their signals alone.
SELF_STOPPING = ("finetune", "pretrain")


class Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler, so that ``with`` blocks (atomic writes) unwind."""

# Module names under dinomed.commands, in the order shown by --help. A module that does not exist yet is
# skipped, so that parts of the CLI can land one at a time.
COMMAND_MODULES = (
    "segment",
    "features",
    "phantom",
    "suv",
    "lesions",
    "finetune",
    "evaluate",
    "pretrain",
    "export_backbone",
    "check_data",
    "recipes",
    "info",
    "demo",
    "classify",
)


class _IntermixedArgumentParser(argparse.ArgumentParser):
    """A subcommand parser whose positionals (e.g. ``key=value`` overrides) may also follow the options:
    ``dinomed pretrain CONFIG --data D --out O optim.epochs=10`` parses like the options-last order.

    ``parse_intermixed_args`` cannot run on the top-level parser (its subcommand positional has
    ``nargs=PARSER``), so each subcommand parser parses its own arguments intermixed.
    """

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        except TypeError:  # a parser argparse cannot parse intermixed (e.g. nargs=REMAINDER)
            return super().parse_known_args(args, namespace)
        finally:
            self._inside = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinomed",
        description="DINOv3 foundation models for PET/CT and CT segmentation (the core of the DINOSeg Slicer extension).",
        epilog="Exit status: 0 done; 2 bad input (one line 'dinomed <cmd>: error: …' on stderr); 3 finetune/pretrain "
        "stopped on request (SIGTERM or SIGINT) or at train.stop_after, with a checkpoint saved: continue with --resume.",
    )
    parser.add_argument("--version", action="version", version=f"dinomed {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedArgumentParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"dinomed.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dinomed.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a relaunch under torchrun
    if argv is None:  # run as a program (not in-process by a test or a front-end)
        from ._startup import pause_gc_in_heavy_imports

        _enable_stack_dumps()
        pause_gc_in_heavy_imports()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    restore = None
    if args.command not in SELF_STOPPING:
        restore = _install_sigterm()
    try:
        return int(args.func(args) or 0)
    except Terminated:
        _stopped(args, "stopped by SIGTERM")
        return EXIT_SIGTERM
    except DinomedError as exc:
        if getattr(args, "events", False):
            from .events import EventWriter

            EventWriter(enabled=True).error(str(exc))
        print(f"dinomed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command in SELF_STOPPING:
            print(f"dinomed {args.command}: interrupted", file=sys.stderr)
        else:
            _stopped(args, "interrupted (SIGINT)")
        return EXIT_SIGINT
    finally:
        if restore is not None:
            restore()


def _stopped(args, why: str) -> None:
    from .atomic import remove_live_temps

    removed = remove_live_temps()
    message = f"{why}; no output was left half-written" + (f" ({len(removed)} temporary file(s) removed)" if removed else "")
    if getattr(args, "events", False):
        from .events import EventWriter

        EventWriter(enabled=True).error(message)
    print(f"dinomed {args.command}: {message}", file=sys.stderr)


def _enable_stack_dumps() -> None:
    """SIGUSR1 prints every thread's Python stack to stderr and the process goes on (faulthandler, which
    does this from its C signal handler, so it works while the main thread is inside a long C call). POSIX
    only; skipped where stderr has no file descriptor."""
    import faulthandler
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, OSError, RuntimeError, ValueError):  # no usable sys.stderr (e.g. pythonw)
        pass


def _install_sigterm():
    """Turn SIGTERM into :class:`Terminated` in the main thread; returns a function that restores the old
    handler (main() is also called in-process by tests). A no-op outside the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
