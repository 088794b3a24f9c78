"""Keep library chatter off the user's terminal (diffusers, transformers, hub progress bars).

The CLI calls `quiet_libraries()` once at start unless --debug is given; our own progress
display is the one the user reads. Warnings that matter reach the user through our errors.
"""

from __future__ import annotations

import logging
import os
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
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
