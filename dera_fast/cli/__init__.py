"""Command line: ``python -m dera_fast <command>`` (also installed as ``dera-fast``).

One module per command; each has ``add_parser(subparsers)`` and ``run(args) -> int``.
Exit codes: 0 success, 2 bad arguments or files, 3 missing optional dependency; one line on stderr, no traceback
unless ``DERA_FAST_DEBUG=1``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ._common import CLIError

# command modules, in the order `--help` lists them
COMMANDS = ("info", "selftest", "demo", "train", "tokenize", "reconstruct", "generate", "eval", "bench",
            "convert_teacher", "prepare_data")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dera_fast", description="DeRA and LARP video tokenizers, their AR generator and kernels.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def _run(args) -> int:
    import torch

    from dera_fast import use_backend

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "dtype", "auto") == "fp16":
        logging.getLogger("dera_fast").warning("fp16 can overflow in these models; bf16 is the safe low precision")
    backend = getattr(args, "backend", "auto")
    if backend == "auto":  # leave the choice to DERA_FAST_BACKEND / an enclosing use_backend()
        return args.func(args)
    with use_backend(backend):
        return args.func(args)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


def entry() -> None:
    """The console entry point (``dera-fast``, ``python -m dera_fast``): :func:`main`, then exit with its code.

    Under torchrun (``WORLD_SIZE`` > 1) the process ends with ``os._exit`` once everything is flushed (every output
    file is already fsynced and renamed): torch's gloo process group can deadlock in its destructor at interpreter
    teardown (it joins its worker thread while holding the GIL); seen in a DDP test worker.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    logging.basicConfig(level=logging.INFO if main_rank else logging.ERROR, format="%(message)s")
    if os.environ.get("DERA_FAST_DEBUG") == "1":  # full tracebacks for bug reports
        return _run(args)
    from safetensors import SafetensorError

    from dera_fast.backends import BackendUnavailableError

    try:
        return _run(args)
    except CLIError as e:
        print(f"dera_fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return e.code
    except (ImportError, BackendUnavailableError) as e:
        print(f"dera_fast {args.command}: missing optional dependency: {_one_line(e)}", file=sys.stderr)
        return 3
    except (OSError, ValueError, SafetensorError) as e:  # unreadable / unwritable files, bad values
        print(f"dera_fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dera_fast {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["CLIError", "COMMANDS", "build_parser", "main"]
