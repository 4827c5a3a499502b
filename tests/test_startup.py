"""Start-up output a person reads: one line per phase with its elapsed seconds, and no
library progress bars or warnings at the default log level."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from contextlib import redirect_stdout

import pytest

from common import startup


def test_a_phase_says_its_elapsed_seconds_and_a_failure() -> None:
    out = io.StringIO()
    startup.set_process_name("worker w0")
    try:
        with redirect_stdout(out):
            with startup.phase("loaded m", start="loading m"):
                pass
            with pytest.raises(RuntimeError), startup.phase("warmed up"):
                raise RuntimeError("boom")
    finally:
        startup.set_process_name("")
    lines = out.getvalue().splitlines()
    assert lines[0] == "worker w0: loading m"
    assert re.fullmatch(r"worker w0: loaded m in \d+\.\d s", lines[1])
    assert re.fullmatch(r"worker w0: warmed up: failed after \d+\.\d s", lines[2])


def test_quiet_libraries_turns_off_bars_and_library_warnings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers.utils import logging as hf_logging

    # Restored after the test: quiet_libraries sets them for the process.
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "warning")
    monkeypatch.setenv("TQDM_DISABLE", "0")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        startup.quiet_libraries(logging.INFO)
        warnings.warn("meant for library authors", FutureWarning, stacklevel=1)
    try:
        assert not hf_logging.is_progress_bar_enabled()
        assert caught == []
        assert os.environ["TQDM_DISABLE"] == "1"  # plain tqdm (the GGUF conversion's bar)
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
