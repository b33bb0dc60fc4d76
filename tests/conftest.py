"""Session-wide test settings. No test reaches the Hugging Face hub (configs ship inside the package): offline, an
unknown repository is refused at once, where a machine without internet would wait out memplan's hub time box
(memplan.spec.catalog.HUB_TIMEOUT_S, 20 s) per lookup. Set before any test module imports huggingface_hub, which
reads it once; subprocesses inherit it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
