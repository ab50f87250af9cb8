"""The one way tformer reads a pretrained model, tokenizer or config: a local directory, or a
Hugging Face Hub name, offline first.

A Hub name is looked up in the local cache first (``local_files_only=True``: no network at all).
Only on a cache miss is the network used, and then only after one quick probe of the Hub:
without it, `huggingface_hub` retries an unreachable host with back-off (1+2+4+8+8 s) for each
file, and `from_pretrained` asks for several (measured: 47 s before the error, after a page of
retry warnings). A short global ``HF_HUB_ETAG_TIMEOUT`` would not help (the retries
are on connection errors, not timeouts) and would also cut slow but working downloads, so the
probe is the sound choice: one HEAD request with a short timeout, through `huggingface_hub`'s
own HTTP client (so ``HF_ENDPOINT`` and proxy settings apply). ``HF_HUB_OFFLINE=1`` skips the
probe and fails at once.

Every failure to find the files becomes one ``FileNotFoundError``, whose message says to pass a
local directory when a Hub name could not be used; the CLI prints it as one line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import constants, is_offline_mode
from huggingface_hub.utils import get_session

log = logging.getLogger(__name__)

#: Seconds to wait for the Hub to answer the probe. DNS failures answer at once; this bounds a
#: network that drops packets silently.
PROBE_TIMEOUT = 5.0


def looks_like_path(text: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else with a separator, or starting with
    ``.``, ``/`` or ``~``, is a local path (so a typo gets "does not exist", not a Hub lookup)."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the Hugging Face Hub endpoint answers at all (any HTTP status)."""
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # connection refused, DNS, timeout, offline mode: all "no"
        log.debug("Hub probe failed: %s", error)
        return False
    return True


def from_pretrained(loader: Any, name_or_path: str | os.PathLike[str], what: str,
                    **kwargs: Any) -> Any:
    """``loader.from_pretrained(name_or_path, **kwargs)``, offline first.

    ``loader`` is a class with ``from_pretrained`` (``AutoTokenizer``, ``AutoConfig``,
    ``AutoModelForSeq2SeqLM``, ...); ``what`` names the thing in error messages.

    Raises:
        FileNotFoundError: a local path that does not exist or is not a directory, or a Hub name
            that is neither cached nor downloadable (no network): the message says to pass a
            local directory.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{what} path {text} is a file; give its directory")
        try:
            return loader.from_pretrained(str(path), **kwargs)
        except OSError as error:
            raise FileNotFoundError(f"{what} directory {text}: {_first_line(error)}") from error
    if looks_like_path(text):
        raise FileNotFoundError(f"{what} directory {text} does not exist")
    offline: dict[str, Any] = {"local_files_only": True}
    if hasattr(loader, "_model_mapping"):
        # The Auto*Model classes of transformers 5.24 look for a PEFT adapter_config.json
        # without passing local_files_only on (and retry for 23 s offline): pass it to them.
        offline["adapter_kwargs"] = {"local_files_only": True}
    try:  # the local Hugging Face cache: no network
        return loader.from_pretrained(text, **offline, **kwargs)
    except OSError as error:
        cache_miss = error
    if is_offline_mode() or not hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if is_offline_mode() else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"{what} {text!r} is not a local directory and not in the Hugging Face cache, and "
            f"{reason}; pass a local directory instead (e.g. one made on a machine with a "
            f"network by `hf download {text} --local-dir DIR`)"
        ) from cache_miss
    try:
        return loader.from_pretrained(text, **kwargs)
    except OSError as error:  # unknown name, gated repository, missing file
        raise FileNotFoundError(
            f"{what} {text!r} could not be loaded from the Hugging Face Hub "
            f"({_first_line(error)}); check the name, or pass a local directory"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
