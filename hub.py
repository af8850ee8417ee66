"""Downloads from the Hugging Face hub, through huggingface_hub (its cache, HF_HUB_OFFLINE,
progress bars), with errors that say what to do instead."""

from pathlib import Path

from common import GrafitoError


class HubUnavailable(GrafitoError):
    """The hub cannot be reached (offline, HF_HUB_OFFLINE=1) and the file is not cached."""


class HubFileMissing(GrafitoError):
    """The repository exists but does not hold this file."""


def download(repo_id, filename, repo_type="model", local_hint="", revision=None):
    """Path of `filename` from hub repo `repo_id` (at `revision`, default main), downloaded
    into the hub cache if needed.

    local_hint says how to use a local copy instead; it ends the offline error message.
    """
    from huggingface_hub import errors, hf_hub_download

    what = f"{repo_type} {repo_id!r}, file {filename!r}"
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision))
    except errors.LocalEntryNotFoundError:
        raise HubUnavailable(
            f"cannot download {what}: the Hugging Face hub is unreachable (offline, or HF_HUB_OFFLINE=1) "
            f"and the file is not in the local cache. {local_hint}".strip()) from None
    except errors.RemoteEntryNotFoundError:
        raise HubFileMissing(f"{what} does not exist on the hub") from None
    except errors.HfHubHTTPError as err:
        raise _http_error(err, f"hub {repo_type} {repo_id!r}", what, local_hint) from None


def dataset_files(repo_id, revision=None, local_hint=""):
    """(commit, {file path: size in bytes or None}) of a hub dataset at `revision` (default main).

    Listing needs the hub itself: offline (HF_HUB_OFFLINE=1, or no network) is one error
    ending with local_hint.
    """
    from huggingface_hub import HfApi, errors

    what = f"hub dataset {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline = (f"cannot list the files of {what}: the Hugging Face hub is unreachable (offline, or "
               f"HF_HUB_OFFLINE=1). {local_hint}").strip()
    try:
        info = HfApi().dataset_info(repo_id, revision=revision, files_metadata=True)
    except errors.OfflineModeIsEnabled:
        raise HubUnavailable(offline) from None
    except errors.RevisionNotFoundError:
        raise GrafitoError(f"{what}: no such revision (a branch, tag or commit of the dataset)") from None
    except errors.HfHubHTTPError as err:
        raise _http_error(err, f"hub dataset {repo_id!r}", what, local_hint) from None
    except Exception as err:  # the HTTP client's own errors: no network, refused, timed out
        raise HubUnavailable(f"{offline} ({type(err).__name__}: {err})") from None
    return info.sha, {sibling.rfilename: sibling.size for sibling in info.siblings or []}


def card_configs(readme):
    """The `configs` list of a dataset card's YAML header (which files form which subset and
    split), or None if it has none."""
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(readme) or {}
    except Exception as err:  # a card whose YAML does not parse: the files are still there
        print(f"note: {readme}: its YAML header does not parse ({type(err).__name__}); finding the split by file names")
        return None
    configs = metadata.get("configs")
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else None


def _http_error(err, repo, what, local_hint):
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return GrafitoError(f"{what} is gated: accept its terms on huggingface.co and log in "
                            f"(hf auth login). {local_hint}".strip())
    if isinstance(err, errors.RepositoryNotFoundError):
        return GrafitoError(f"{repo} not found (or private). {local_hint}".strip())
    return GrafitoError(f"downloading {what} failed: {err}. {local_hint}".strip())
