"""Downloads from the Hugging Face hub, through huggingface_hub (its cache, HF_HUB_OFFLINE,
progress bars), with errors that say what to do instead."""

from pathlib import Path

from common import GrafitoError


class HubUnavailable(GrafitoError):
    """The hub cannot be reached (offline, HF_HUB_OFFLINE=1) and the file is not cached."""


class HubFileMissing(GrafitoError):
    """The repository exists but does not hold this file."""


def download(repo_id, filename, repo_type="model", local_hint=""):
    """Path of `filename` from hub repo `repo_id`, downloaded into the hub cache if needed.

    local_hint says how to use a local copy instead; it ends the offline error message.
    """
    from huggingface_hub import errors, hf_hub_download

    what = f"{repo_type} {repo_id!r}, file {filename!r}"
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type))
    except errors.LocalEntryNotFoundError:
        raise HubUnavailable(
            f"cannot download {what}: the Hugging Face hub is unreachable (offline, or HF_HUB_OFFLINE=1) "
            f"and the file is not in the local cache. {local_hint}".strip()) from None
    except errors.RemoteEntryNotFoundError:
        raise HubFileMissing(f"{what} does not exist on the hub") from None
    except errors.GatedRepoError:
        raise GrafitoError(f"{what} is gated: accept its terms on huggingface.co and log in "
                           f"(hf auth login). {local_hint}".strip()) from None
    except errors.RepositoryNotFoundError:
        raise GrafitoError(f"hub {repo_type} {repo_id!r} not found (or private). {local_hint}".strip()) from None
    except errors.HfHubHTTPError as err:
        raise GrafitoError(f"downloading {what} failed: {err}. {local_hint}".strip()) from None
