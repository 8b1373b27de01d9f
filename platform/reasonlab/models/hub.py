"""A Hugging Face hub id named by `model.pretrained`, checked once by the driver before anything starts.

`from_pretrained` retries an unreachable hub with backoff for about 25 s per file and then fails, and the
driver (tokenizer) and every Ray worker (model) would each do so in turn; without a network that looked like
a hang. The driver asks the hub once instead, with a short timeout, and a model it cannot have is a
ConfigError: one line, exit status 2, before Ray starts.
"""
from __future__ import annotations

import threading

from reasonlab.errors import ConfigError

HUB_TIMEOUT_S = 10.0  # the hub answers model queries in well under a second


def check_hub_model(repo_id: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Raise ConfigError unless `repo_id` (a syntactically valid hub id) is a model this machine can load:
    in the local Hugging Face cache, or on the hub and answering within `timeout` seconds."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    key = f"model.pretrained: {repo_id}"
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # loads from the cache (offline too)
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                          f"HF_HUB_OFFLINE is set; download it while online, or name a local model folder")
    api = HfApi()
    answer: dict = {}

    def ask() -> None:  # in a thread: a stalled DNS lookup or proxy is not covered by the request's timeout
        try:
            answer["info"] = api.model_info(repo_id, timeout=timeout)
        except Exception as e:  # noqa: BLE001 (reported below, in one line)
            answer["error"] = e

    thread = threading.Thread(target=ask, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    error = answer.get("error")
    if thread.is_alive():
        raise ConfigError(f"{key}: no answer from {api.endpoint} within {timeout:g} s; check the network "
                          f"(HF_ENDPOINT, proxies), or name a local model folder")
    if isinstance(error, GatedRepoError):
        raise ConfigError(f"{key} is gated on {api.endpoint}: accept its terms there and log in (hf auth login)")
    if isinstance(error, RepositoryNotFoundError):
        raise ConfigError(f"{key}: no such model on {api.endpoint} (or it is private and no token is set)")
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", "an error")
        raise ConfigError(f"{key}: {api.endpoint} answered {status}; expected a model repository")
    if error is not None:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"{key}: cannot reach {api.endpoint} ({reason}); check the network, set HF_HUB_OFFLINE=1 "
                          f"with the model in the cache, or name a local model folder")
    files = [s.rfilename for s in answer["info"].siblings or []]
    if files and "config.json" not in files:
        raise ConfigError(f"{key}: the repository has no config.json; expected a transformers model")
