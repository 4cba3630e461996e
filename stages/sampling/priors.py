"""The priors of an autoencoder: checking that a prior artifact was trained on its codes, and
loading one prior per level."""

from __future__ import annotations

from models.io import MODEL_FILES
from models.prior import CodePrior
from models.vqvae2 import VQVAE2Config
from stages.formats.codes import CodeShardError


def check_prior_of(artifact, autoencoder_key: str, what: str) -> None:
    """CodeShardError unless the prior `artifact` was trained on codes of `autoencoder_key`,
    the autoencoder of `what` (e.g. "the decoder")."""
    trained_on = artifact.metrics.get("autoencoder_key")
    if trained_on != autoencoder_key:
        raise CodeShardError(
            f"prior {artifact.uri} was trained on codes of autoencoder {str(trained_on)[:12]}, "
            f"but {what} is autoencoder {autoencoder_key[:12]}; train the prior on the codes "
            "of this autoencoder (encode with it, then train_prior on those shards)"
        )


def load_priors(artifacts: list, autoencoder_key: str, ae_config: VQVAE2Config):
    """Loads one prior per level (dict level -> (CodePrior, artifact)) and the class names.

    Raises:
        CodeShardError: a prior of another autoencoder; a level with no prior or two.
    """
    priors: dict = {}
    class_names = None
    for artifact in artifacts:
        metrics = artifact.metrics
        level = metrics.get("level")
        check_prior_of(artifact, autoencoder_key, "the decoder")
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
