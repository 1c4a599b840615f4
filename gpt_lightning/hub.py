"""OpenAI's GPT-2 on the Hugging Face hub: its names, and its files fetched into huggingface_hub's cache once
per node. Plain Python; `huggingface_hub` is imported where it is used (the `hf` extra). Below both the
tokenizers (GPT-2's tokenizer.json) and the GPT-2 loader (hf.py), so that neither imports the other for it."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path

from gpt_lightning.data.corpus import is_local_rank_zero, raise_if_failed, record_failure

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's GPT-2 weights on the hub
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def hf_gpt2_folder(name_or_folder: str | Path, files: list[str] = HUB_FILES, wait_s: float = 3600.0) -> Path:
    """A local GPT-2 folder: the folder itself, or a hub name's files in huggingface_hub's cache (downloaded
    on first use; `HF_HUB_OFFLINE=1` reads the cache only). As for the corpus, local rank 0 of each node
    downloads while the node's other processes wait for the files to be in the cache, and stop with local
    rank 0's error as soon as it records one."""
    if str(name_or_folder) not in HUB_NAMES:
        return Path(name_or_folder)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as err:
        raise ImportError("GPT-2 from the hub needs huggingface_hub: pip install -e '.[hf]'") from err
    repo = hub_repo(str(name_or_folder))
    downloads = is_local_rank_zero()
    # Only this node's processes wait for this one: the marker lies in a node-local folder, one per hub cache,
    # and this user's own, so that another user's files there cannot stand in the way.
    cache = hashlib.sha256(str(Path(constants.HF_HUB_CACHE).resolve()).encode()).hexdigest()[:16]
    markers = Path(tempfile.gettempdir()) / f"gpt-lightning-{os.getuid()}"
    failure = markers / f"{name_or_folder}.{cache}.{socket.gethostname()}.failed"
    if downloads:
        failure.unlink(missing_ok=True)  # an earlier launch's
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return Path(snapshot_download(repo, allow_patterns=files, local_files_only=not downloads))
        except Exception as err:  # offline, not cached, or the hub refused: one line, and how to go on
            if downloads or time.monotonic() > deadline:
                error = FileNotFoundError(
                    f"could not get {name_or_folder} from the Hugging Face hub ({type(err).__name__}). Without "
                    f"network, give a local GPT-2 folder ({', '.join(files)}), or set HF_HUB_OFFLINE=1 with the "
                    "files already in huggingface_hub's cache."
                )
                if downloads:
                    record_failure(failure, error)  # the node's other processes stop with it at once
                raise error from None
        raise_if_failed(failure)
        time.sleep(1.0)  # local rank 0 is downloading them


def hub_repo(name: str) -> str:
    return f"openai-community/{name}"


def cached_hub_file(name: str, filename: str) -> Path | None:
    """A file of a hub GPT-2 (`gpt2`, ...) when huggingface_hub's local cache holds it, else None: a look in
    the cache, never a download. The legacy repo name (`gpt2`, as transformers once fetched it) counts too."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in (hub_repo(name), name):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):  # else None, or a marker that the hub said the file does not exist
            return Path(found)
    return None
