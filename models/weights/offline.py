"""Pin the Hugging Face libraries offline and quiet them; import before diffusers/transformers.

Weights only ever come from local directories, and per-file progress bars would fill worker logs.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import diffusers  # noqa: E402
import transformers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
