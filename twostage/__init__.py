"""twostage from Python (notebooks, scripts): run pipelines, open stored artifacts, sample.

    import twostage

    result = twostage.run("configs/mnist_vqvae2.yaml", {"steps.samples.per_class": 10})
    result.refs["codes"]                              # 'encode/c348a29bfc3a...'
    codes = twostage.open_codes(result.refs["codes"])  # the code shards (`CodeDataset`)
    images = twostage.sample(result.refs["vqvae"], [result.refs["prior_top"],
                             result.refs["prior_bottom"]], per_class=2)   # uint8 n h w c

Artifacts are named as ``twostage ls`` prints them (``stage/key-prefix``) and looked up in
`store` (default: ``$TWOSTAGE_STORE`` or ``artifacts``, as for the CLI). This package only
gathers what the CLI and the stages already do; it adds no behaviour of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_STORE = "artifacts"

__all__ = ["run", "artifact", "open_codes", "load_model", "sample"]


def run(
    pipeline: str | Path | dict,
    overrides: dict[str, Any] | None = None,
    store: str | None = None,
    verbosity: int = -1,
):
    """Runs a pipeline file (or the same mapping as a dict) as ``twostage run`` does.

    Args:
        pipeline: A pipeline YAML file, or its content as a dict.
        overrides: ``{"steps.vqvae.train.steps": 100, ...}``, as ``--set`` gives them.
        store: Replaces the file's ``store``.
        verbosity: -1 each step's outcome only, 0 progress lines too, 1 debug lines.

    Returns:
        The `pipeline.runner.RunResult`: ``ok``, ``run_dir``, ``steps`` (status, key, uri,
        error per step) and ``refs`` (step name -> ``stage/key``).

    Raises:
        pipeline.config.ConfigError: the pipeline is invalid (nothing ran).
    """
    from pipeline.runner import run_pipeline
    from pipeline.spec import load_pipeline, parse_pipeline

    items = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]  # JSON is YAML
    if isinstance(pipeline, dict):
        from pipeline.spec import apply_override

        raw = json.loads(json.dumps(pipeline))  # a copy: the caller's dict is kept
        for item in items:
            apply_override(raw, item)
        if store is not None:
            raw["store"] = store
        loaded = parse_pipeline(raw)
    else:
        loaded = load_pipeline(pipeline, items, store)
    return run_pipeline(loaded, verbosity)


def artifact(ref: str, store: str | None = None):
    """The committed artifact `ref` (``stage/key-prefix`` or a key prefix): its ``files``,
    ``config``, ``metrics``, ``manifest`` and ``local_dir(...)``."""
    from pipeline.store import Store

    return Store(_store(store)).find(ref)


def open_codes(ref, store: str | None = None):
    """The code shards of an encode artifact (``encode/key-prefix``, or the `Artifact`):
    ``meta`` (levels, grids, codebook sizes, classes), ``table()``, ``to_ray_dataset()``
    (`stages.formats.codes.CodeDataset`). Files are checked against the manifest first."""
    from stages.formats.codes import open_codes as open_shards

    return open_shards(artifact(ref, store) if isinstance(ref, str) else ref)


def load_model(ref, store: str | None = None, device: str = "cpu"):
    """The model of a train_autoencoder, train_prior, train_classifier or train_sequence
    artifact, in eval mode on `device`."""
    from models.io import MODEL_FILES

    found = artifact(ref, store) if isinstance(ref, str) else ref
    directory = found.local_dir(*MODEL_FILES)
    if found.stage == "train_autoencoder":
        from models.families import load
    elif found.stage == "train_prior":
        from models.prior import CodePrior

        load = CodePrior.load
    elif found.stage == "train_classifier":
        from models.classifier import Classifier

        load = Classifier.load
    elif found.stage == "train_sequence":
        from models.tdvae import TDVAE

        load = TDVAE.load
    else:
        raise ValueError(f"{found.stage}/{found.key[:12]}: a {found.stage} artifact holds no model")
    return load(directory, map_location=device).to(device).eval()


def sample(
    autoencoder,
    priors: list,
    store: str | None = None,
    device: str = "cpu",
    **options,
):
    """New images from a VQ-VAE-2 and one prior per level, as the sample stage draws them.

    Args:
        autoencoder: A train_autoencoder artifact (``train_autoencoder/key-prefix``).
        priors: Its priors, one per level (``train_prior/key-prefix`` each).
        **options: The sample stage's options (``per_class``, ``classes``, ``num_samples``,
            ``temperature``, ``top_k``, ``top_p``, ``guidance``, ``seed``, ``batch_size``).

    Returns:
        (uint8 images ``n h w c``, their class labels or None).

    Raises:
        stages.formats.codes.CodeShardError: a prior of another autoencoder, a level without
            a prior or with two.
    """
    import torch

    from models.families import vqvae2_config
    from pipeline.config import from_dict
    from stages import sample as stage
    from stages.sampling.priors import load_priors

    config = from_dict(stage.Config, options, "sample")
    found = artifact(autoencoder, store) if isinstance(autoencoder, str) else autoencoder
    ae_config = vqvae2_config(json.loads(found.read_bytes("config.json")), found.uri)
    priors_found = [artifact(p, store) if isinstance(p, str) else p for p in priors]
    loaded, class_names = load_priors(priors_found, found, ae_config)
    labels = stage.labels_for(config, class_names)
    target = torch.device(device)
    codes = stage.sample_codes(loaded, labels, config, target)
    images = stage.decode(load_model(found, device=device), codes, config.batch_size, target)
    return images, None if labels is None else labels.numpy()


def _store(store: str | None) -> str:
    return store or os.environ.get("TWOSTAGE_STORE") or DEFAULT_STORE
