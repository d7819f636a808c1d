"""Publishing a trained model's export folder to the Hugging Face Hub, checked before any training.

`run_contrastive.py --push_to_hub true` calls `check_hub_access` first, so a missing or wrong token, a machine
without network or a bad repository id fails with one line before the model is even built, not after hours of
training. The upload
(`upload_export`) then sends the export folder as it was saved -- card, metrics.json, config, weights, processor
files, the model's code and adapters/ -- and leaves out what only training needs (checkpoints, the best-model
copy, staging folders), wherever the run keeps them. The same works on an existing export:

    dualencoder-push outputs/default --repo_id me/flickr8k-clip        # or python -m dualencoder.training.publish
    >>> push_export("outputs/default", "me/flickr8k-clip")              # from Python

Every failure is a `SystemExit` whose text is one line naming what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Optional

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from dualencoder.errors import first_line

# What a training output folder may hold beside the export, never uploaded: resumable checkpoints (`checkpoint-<step>`
# folders, or a `checkpoints/` folder holding them), the best model so far (`best/`, already the exported weights),
# staging or half-written files (`*.tmp`), and the pixel store a run without a feature_cache_dir builds there.
# Each pattern also applies below the top folder.
_TRAINING_ONLY = ("checkpoint-*", "checkpoints", "best", "*.tmp", "pixels-*.arrow")
HUB_IGNORE_PATTERNS = [pattern for name in _TRAINING_ONLY
                       for pattern in (name, f"{name}/*", f"*/{name}", f"*/{name}/*")]
# What the exported model needs to load with AutoModel/AutoProcessor (trust_remote_code) and be understood on the Hub:
# each entry is one file, under any of these names (transformers' versions name weights and processor differently).
EXPORT_FILES = (("README.md",), ("metrics.json",), ("config.json",), ("configuration_dualencoder.py",),
                ("modeling_dualencoder.py",), ("backbones_dualencoder.py",),
                ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
                ("processor_config.json", "preprocessor_config.json"), ("tokenizer_config.json",))
TOKEN_HINT = "set HF_TOKEN, run `hf auth login`, or pass one (--hub_token; dualencoder-push --token)"
LATER = "a run can also train without --push_to_hub and upload later with dualencoder-push"


def _network_errors() -> tuple:
    """The exceptions that mean "the Hub could not be reached", for whichever HTTP client huggingface_hub uses."""
    errors = [ConnectionError, TimeoutError]
    for module, name in (("requests", "RequestException"), ("httpx", "TransportError"), ("httpx2", "TransportError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


NETWORK_ERRORS = _network_errors()


def _fail(what: str) -> SystemExit:
    return SystemExit(f"error: push to the Hub: {what}")


def _hub_call(call, what: str, then: str = LATER):
    """Run one Hub API call, turning its failures into one-line errors: `what` the call was doing, `then` what the
    user can do once the Hub is reachable."""
    try:
        return call()
    except OfflineModeIsEnabled:
        raise _fail(f"HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it ({then})") from None
    except LocalTokenNotFoundError:
        raise _fail(f"no Hugging Face token found: {TOKEN_HINT}; it needs write access") from None
    except HfHubHTTPError as error:  # before the network errors: it is also an HTTP client error
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            raise _fail(f"the Hub refused the token (401 Unauthorized): it is wrong or revoked; {TOKEN_HINT} "
                        "with a valid write token") from None
        raise _fail(f"{what} failed ({status or 'no status'}: {first_line(error)}); {then}") from None
    except NETWORK_ERRORS as error:
        raise _fail(f"cannot reach the Hub ({first_line(error)}): check the network connection (and HF_ENDPOINT "
                    f"if set); {then}") from None


def check_hub_access(repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Check that `repo_id` can receive an upload with `token` and return its full `namespace/name` id.

    In order: the id is valid, the token is known to the Hub (`whoami`, which also needs the network) and may write,
    and the repository exists or can be created (`create_repo(exist_ok=True)`, private if asked). `token=None`
    uses HF_TOKEN or the saved login, as huggingface_hub does. An id without a namespace goes to the token's user.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise _fail(f"{repo_id!r} is not a valid Hub repository id ({str(error).split(':')[0]}): use "
                    "namespace/name, e.g. me/flickr8k-clip (--hub_model_id; dualencoder-push --repo_id)") from None
    api = HfApi(token=token)
    user = _hub_call(api.whoami, "checking the token (whoami)")
    role = user.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise _fail(f"the token of {user.get('name')} is read-only: create a write token at "
                    "https://huggingface.co/settings/tokens and " + TOKEN_HINT)
    full_id = repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"
    _hub_call(lambda: api.create_repo(full_id, private=private, exist_ok=True, repo_type="model"),
              f"creating or finding the repository {full_id} as {user.get('name')} (is the namespace yours?)")
    return full_id


def check_run_can_publish(train_args) -> Optional[str]:
    """For a run with --push_to_hub, the checked full repository id (see `check_hub_access`), else None.

    Without --hub_model_id the repository is named after output_dir, under the token's user (as HF's scripts do).
    """
    if not train_args.push_to_hub:
        return None
    repo_id = train_args.hub_model_id or os.path.basename(os.path.abspath(train_args.output_dir))
    return check_hub_access(repo_id, train_args.hub_token, train_args.hub_private_repo)


def check_export(folder: str) -> None:
    """Refuse a `folder` that lacks a file of a complete export (a training output_dir before its run ended)."""
    missing = [names[0] for names in EXPORT_FILES
               if not any(os.path.isfile(os.path.join(folder, name)) for name in names)]
    if missing:
        raise _fail(f"{folder} is not a complete export (no {', '.join(missing)}): run_contrastive.py writes one at "
                    "the end of a run; pass that run's output_dir")


def upload_export(folder: str, repo_id: str, token: Optional[str] = None,
                  commit_message: str = "Upload dual encoder") -> str:
    """Upload the export `folder` as it is to `repo_id` (already checked), without training leftovers; the URL."""
    check_export(folder)
    return _upload(folder, repo_id, token, commit_message)


def push_export(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Check access to `repo_id`, then upload the export `folder` there; the commit's URL."""
    check_export(folder)  # before any network call
    return _upload(folder, check_hub_access(repo_id, token, private), token)


def _upload(folder: str, repo_id: str, token: Optional[str], commit_message: str = "Upload dual encoder") -> str:
    commit = _hub_call(lambda: HfApi(token=token).upload_folder(
        repo_id=repo_id, folder_path=folder, repo_type="model", ignore_patterns=HUB_IGNORE_PATTERNS,
        commit_message=commit_message), f"uploading {folder} to {repo_id}",
        then=f"the model stays saved in {folder}: retry with dualencoder-push {folder} --repo_id {repo_id}")
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="dualencoder-push", description=(
        "Upload a trained model's export folder (run_contrastive.py's output_dir) to the Hugging Face Hub: card, "
        "metrics, config, weights, processor, model code and adapters, without checkpoints or best/."))
    parser.add_argument("folder", help="the export folder (a run's output_dir)")
    parser.add_argument("--repo_id", required=True, help="Hub repository, namespace/name (a bare name: your user's)")
    parser.add_argument("--token", default=None, help="write token (default: HF_TOKEN, else the saved login)")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is new)")
    args = parser.parse_args(argv)
    url = push_export(args.folder, args.repo_id, token=args.token, private=args.private)
    print(f"uploaded {args.folder} to {url}")
    return url


if __name__ == "__main__":
    main()
