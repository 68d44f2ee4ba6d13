"""Whether the Hugging Face hub serves a model to this machine, checked in seconds before any work."""

from huggingface_hub import HfApi, constants, get_token

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.params import OFFLINE, ModelParams

CHECK_TIMEOUT_S = 5


class ModelLoadError(ExpectedError, RuntimeError):
    """The model cannot be loaded here; the message says what to set."""


def hub_problem(model: ModelParams, err: Exception) -> str:
    """`model` at its revision, why the hub did not serve it, and every way on, in one line."""
    token = "a Hugging Face token was found" if get_token() else "no Hugging Face token was found"
    reason = " ".join(f"{type(err).__name__}: {err}".split())  # the hub's messages span lines
    return (
        f"model {model.id!r} at revision {model.revision!r} from the Hugging Face hub: {reason:.400} ({token}). It may "
        f"be gated: accept its terms on https://huggingface.co/{model.id}, then set HF_TOKEN or run `hf auth login`; "
        f"check network access (or set HF_HUB_OFFLINE=1 with the model in the cache); or run offline: {OFFLINE}"
    )


def check_hub_access(model: ModelParams) -> None:
    """ModelLoadError within seconds unless the hub serves `model` here (a local model or HF_HUB_OFFLINE: no check)."""
    if model.kind != "hub" or constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().model_info(model.id, revision=model.revision, timeout=CHECK_TIMEOUT_S)
        HfApi().auth_check(model.id)  # a gated model's files need its terms accepted
    except Exception as err:  # noqa: BLE001 - no network, a proxy, no access, no such model: all need the advice
        raise ModelLoadError(f"cannot reach {hub_problem(model, err)}") from None
