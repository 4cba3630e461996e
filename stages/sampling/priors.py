"""The priors of an autoencoder: checking that a prior artifact was trained on its codes, and
loading one prior per level."""

from __future__ import annotations

from models.io import MODEL_FILES
from models.prior import CodePrior
from models.vqvae2 import VQVAE2Config
from stages.formats.codes import CodeShardError


def weights_of(autoencoder) -> str | None:
    """The sha256 of an autoencoder artifact's weights (what encode and priors record)."""
    return autoencoder.files.get("model.safetensors", {}).get("sha256")


def check_prior_of(artifact, autoencoder, what: str) -> None:
    """CodeShardError unless the prior `artifact` was trained on codes of `autoencoder` (a key,
    or the artifact: then its weights too), the autoencoder of `what` (e.g. "the decoder")."""
    key = autoencoder if isinstance(autoencoder, str) else autoencoder.key
    trained_on = artifact.metrics.get("autoencoder_key")
    if trained_on != key:
        raise CodeShardError(
            f"prior {artifact.uri} was trained on codes of autoencoder {str(trained_on)[:12]}, "
            f"but {what} is autoencoder {key[:12]}; train the prior on the codes "
            "of this autoencoder (encode with it, then train_prior on those shards)"
        )
    recorded = artifact.metrics.get("autoencoder_weights")  # absent in older priors
    stored = None if isinstance(autoencoder, str) else weights_of(autoencoder)
    if recorded and stored and recorded != stored:
        raise CodeShardError(
            f"prior {artifact.uri} was trained on codes of other weights of autoencoder "
            f"{key[:12]} (sha256 {recorded[:12]}, now {stored[:12]}): its stored weights "
            "changed after its codes were encoded; encode again and retrain the prior"
        )


def load_priors(artifacts: list, autoencoder, ae_config: VQVAE2Config):
    """Loads one prior per level (dict level -> (CodePrior, artifact)) and the class names.
    `autoencoder`: the autoencoder artifact (or its key: then its weights are not checked).

    Raises:
        CodeShardError: a prior of another autoencoder or of other weights of it; a level
            with no prior or two.
    """
    priors: dict = {}
    class_names = None
    for artifact in artifacts:
        metrics = artifact.metrics
        level = metrics.get("level")
        check_prior_of(artifact, autoencoder, "the decoder")
        if level in priors:
            raise CodeShardError(f"two priors for level {level!r}: {artifact.uri} and another")
        if class_names is not None and metrics.get("class_names", []) != class_names:
            raise CodeShardError(
                f"prior {artifact.uri}: its classes differ from the other priors'; "
                "train all levels with the same model.class_conditional"
            )
        class_names = metrics.get("class_names", [])
        priors[level] = (CodePrior.load(artifact.local_dir(*MODEL_FILES)), artifact)
    missing = [lv for lv in ae_config.level_names if lv not in priors]
    if missing:
        raise CodeShardError(
            f"no prior for level(s) {', '.join(missing)}; add a train_prior step per level"
        )
    extra = [lv for lv in priors if lv not in ae_config.level_names]
    if extra:
        raise CodeShardError(f"prior level(s) {', '.join(extra)} are not levels of the autoencoder")
    return priors, class_names or []
