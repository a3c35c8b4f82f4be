"""Models named by their Hugging Face Hub id, `org/name` or `org/name@revision` (a branch, tag or commit), resolved
to a local snapshot folder through huggingface_hub: its cache (HF_HOME, HF_HUB_CACHE), offline mode
(HF_HUB_OFFLINE=1), its progress bars and its resumed downloads. Only the files ktjax reads are fetched. A local
path of the same name always wins."""
from __future__ import annotations

import os
import re

from ktjax.errors import KtjaxError

# What ktjax reads from a Hugging Face folder, at its top level: nothing else of a repository is downloaded (not
# its README, modeling code, or other formats' weights in subfolders).
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "model.safetensors.index.json", "*.safetensors"]
IGNORED = ["*/*"]
_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(f"{_PART}/{_PART}", re.ASCII)
_REVISION = re.compile(r"[\w.-]+(?:/[\w.-]+)*", re.ASCII)  # refs/pr/1 is one
_HINT = "(org/name, or org/name@revision)"


def parse_model_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) for a well-formed Hub model id, else None. '--' and '..' are refused as the
    Hub refuses them (a revision with '..' would also name a path outside the cache's refs/)."""
    repo, at, revision = name.partition("@")
    if not _REPO_ID.fullmatch(repo) or "--" in repo or ".." in name:
        return None
    if at and not _REVISION.fullmatch(revision):
        return None
    return repo, revision or None


def resolve_model(name, flag: str = "") -> str:
    """The folder that `name` names: the path itself when anything exists there (a local folder wins), else the
    snapshot of the Hub model `name` names, downloaded into huggingface_hub's cache unless it is there already.
    `flag` (e.g. "--model") starts each message. Every failure is one KtjaxError."""
    where = f"{flag} {name}" if flag else str(name)
    if isinstance(name, str) and not name:
        raise KtjaxError(f"{flag or 'the model name'} is empty; name a model folder or a Hugging Face model id "
                         f"{_HINT}")
    if not isinstance(name, str) or os.path.lexists(name):
        return name  # the caller says what is wrong with a path that is not a model folder
    parsed = parse_model_id(name)
    if parsed is None:
        raise KtjaxError(f"{where}: no such folder, nor a Hugging Face model id {_HINT}")
    folder = _snapshot(*parsed, where)
    _check_snapshot(folder, where)
    return folder


def _snapshot(repo: str, revision: str | None, where: str) -> str:
    """huggingface_hub's snapshot_download of the files ktjax reads, its exceptions turned into one message each."""
    from huggingface_hub import constants, errors, snapshot_download

    try:
        return snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, ignore_patterns=IGNORED)
    except errors.GatedRepoError:
        raise KtjaxError(f"{where}: a gated model; accept its terms on huggingface.co/{repo} and log in "
                         "(`hf auth login`, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise KtjaxError(f"{where}: no such folder, and no such model on the Hugging Face Hub (a private one needs "
                         "`hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise KtjaxError(f"{where}: the Hugging Face Hub has {repo} but no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError as e:
        if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):
            raise KtjaxError(f"{where}: its cached snapshot is incomplete and the Hub cannot be reached; run again "
                             "online to finish the download") from None
        if constants.HF_HUB_OFFLINE:
            raise KtjaxError(f"{where}: no such folder, and not in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so nothing is downloaded: run once "
                             "without it to download the model (README, \"Models by name\")") from None
        raise KtjaxError(f"{where}: no such folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and "
                         f"the Hub ({constants.ENDPOINT}) cannot be reached; check the network") from None
    except (OSError, ValueError) as e:  # the Hub's other HTTP errors, a full disk, a name the Hub refuses
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KtjaxError(f"{where}: downloading it from the Hugging Face Hub failed: {first_line}") from None


def _check_snapshot(folder: str, where: str):
    """A snapshot that lacks a file ktjax needs (an interrupted download read offline, or a repository that is not a
    DeepSeek model) is refused here, naming the files, rather than by the loader with a cache path."""
    from ktjax.util.jsonio import read_json

    needed = ["config.json"]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        raw = read_json(index, "safetensors index")  # a malformed index is the loader's to describe
        shards = raw.get("weight_map") if isinstance(raw, dict) else None
        needed += sorted({f for f in shards.values() if isinstance(f, str)}) if isinstance(shards, dict) else []
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]  # isfile: a dangling link is missing
    if not os.path.isfile(index) and not any(f.endswith(".safetensors") and os.path.isfile(os.path.join(folder, f))
                                             for f in os.listdir(folder)):
        missing.append("weights (*.safetensors)")
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise KtjaxError(f"{where}: its snapshot ({folder}) lacks {listed}: an interrupted download (run again "
                         "online, without HF_HUB_OFFLINE, to resume it) or not a DeepSeek model repository")


def hub_model_id(folder: str) -> str | None:
    """`org/name` when `folder` is a snapshot in huggingface_hub's cache (models--org--name/snapshots/<commit>),
    else None: the name a server reports for a model loaded by its Hub id."""
    parts = os.path.abspath(folder).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1)
    return None
