"""Publishing a release on the Hugging Face Hub: the folder a trainer saved (the update, its metadata and
model card), checked before anything leaves the machine."""
from __future__ import annotations

from pathlib import Path

from models.updates import CARD_FILE, FULL_FILE, METADATA_FILE, PEFT_CONFIG, PEFT_WEIGHTS, load_update

RELEASE_FILES = (METADATA_FILE, CARD_FILE, PEFT_CONFIG, PEFT_WEIGHTS, FULL_FILE)  # never checkpoints or locks


def push_release(folder: str | Path, repo_id: str, private: bool = True, api=None) -> str:
    """Uploads a finished release folder to `repo_id` (created if missing) and returns the commit URL.
    The token comes from HF_TOKEN or `hf auth login`; `api` is an `HfApi` (default: a new one)."""
    folder = Path(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--push_to_hub needs a repo id of the form owner/name, got {repo_id!r}")
    load_update(folder)  # a corrupt, unfinished or foreign folder fails here, with what is wrong
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    files = sorted(f.name for f in folder.iterdir() if f.name in RELEASE_FILES)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=files,
                               commit_message=f"Trap² release: {', '.join(files)}")
    return str(getattr(commit, "commit_url", commit))
