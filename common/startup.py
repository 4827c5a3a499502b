"""Start-up output a person reads: one line per phase (converting, loading, warming up)
with its elapsed seconds, and the libraries' own progress bars and warnings kept out of
it unless the log level is DEBUG.

The lines go to stdout (not the log), so ``llmcluster up`` shows them while its children
log at WARNING; each names the process (``worker local-0``) since several share a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator

_who = ""  # the process's name in its phase lines, set once at start-up


def set_process_name(name: str) -> None:
    global _who
    _who = name


def say(text: str) -> None:
    """One start-up line on stdout, prefixed with the process's name."""
    print(f"{_who}: {text}" if _who else text, flush=True)


@contextlib.contextmanager
def phase(done: str, *, start: str = "") -> Iterator[None]:
    """Times a phase and says ``done`` with its elapsed seconds when it ends (``start``
    first, for a phase long enough that silence would look like a hang)."""
    if start:
        say(start)
    began = time.monotonic()
    try:
        yield
    except BaseException:
        say(f"{done}: failed after {time.monotonic() - began:.1f} s")
        raise
    say(f"{done} in {time.monotonic() - began:.1f} s")


def quiet_libraries(log_level: int) -> None:
    """Above DEBUG: no tqdm bars from transformers / huggingface_hub and no library
    warnings (deprecations meant for library authors, not for a person starting us)."""
    if log_level <= logging.DEBUG:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # transformers' GGUF conversion uses plain tqdm, which reads TQDM_* overrides.
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.warnoptions:
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|torch|peft)")
    with contextlib.suppress(ImportError):  # only processes that load models call this
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
