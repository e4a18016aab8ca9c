"""One switch for every progress bar the library draws (as diffusers' ``set_progress_bar_config``).

A bar is shown or not by, first, the call's ``progress=`` argument (``True`` / ``False``); when that is ``None``
(every library call's default), by the package setting :func:`set_progress_bar_config`, whose start value comes
from the ``DERA_FAST_PROGRESS`` environment variable: ``0`` off, ``1`` on, unset: tqdm's own rule (shown in a
terminal or a notebook, hidden when stderr is a file or a pipe: logs, CI, torchrun output).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

from tqdm.auto import tqdm

_OFF, _ON = ("0", "false", "off", "no"), ("1", "true", "on", "yes")


def _disable_from_env() -> bool | None:
    value = os.environ.get("DERA_FAST_PROGRESS", "").strip().lower()
    if value in _OFF:
        return True
    if value in _ON:
        return False
    if value not in ("", "auto"):
        warnings.warn(f"DERA_FAST_PROGRESS={value!r} not understood (use 0 or 1): progress bars left on auto",
                      stacklevel=2)
    return None


_config: dict[str, Any] = {"disable": _disable_from_env()}


def set_progress_bar_config(**settings) -> None:
    """Set how the library's progress bars behave, package-wide (``encode_video``, ``encode_stream``, ``generate``,
    the trainers, the evaluations, dataset indexing). Each call replaces the settings of the one before;
    ``set_progress_bar_config()`` restores the defaults.

    Keyword arguments:
        disable: True hides every bar, False shows them even in log files, None is tqdm's rule (shown in a terminal
            or notebook); left out, it comes from ``DERA_FAST_PROGRESS``. A call's ``progress=True`` / ``False``
            still wins.
        any other tqdm argument (``leave``, ``file``, ``mininterval``, ``ncols``, ...): used by every bar.
    """
    _config.clear()
    _config.update({"disable": _disable_from_env()}, **settings)


def progress_bar(iterable: Iterable | None = None, *, progress: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or one updated by hand) that obeys the switch.

    ``progress`` True / False decides for this call; None follows the package setting. ``kwargs`` go to tqdm
    (``desc``, ``total``, ``unit``, ...); the package's tqdm settings override them.
    """
    settings = {"dynamic_ncols": True, **kwargs, **_config}
    if progress is not None:
        settings["disable"] = not progress
    return tqdm(iterable, **settings)
