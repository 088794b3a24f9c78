"""Keep library chatter off the user's terminal (diffusers, transformers, hub progress bars).

The CLI calls `quiet_libraries()` once at start unless --debug is given; our own progress
display is the one the user reads. Warnings that matter reach the user through our errors.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate", "insightface", "timm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # These come from library internals on every run and say nothing the user can act on.
    for pattern in (".*Already found a `peft_config`.*", ".*NumPy array is not writable.*",
                    ".*should be kept in float32.*", ".*deprecated.*", ".*copy keyword.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The libraries read these when they first configure their loggers; setting them costs
    # nothing, while importing diffusers here to call its API cost every CLI command (even
    # `--help` and a one-line refusal) ~4 s idle and 16 s measured on the loaded 2-core box.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # tqdm >= 4.66 reads TQDM_DISABLE for every bar, the libraries' own wrappers included.
    if "diffusers" in sys.modules:  # already imported (a Python API caller): tell it directly
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
