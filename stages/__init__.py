"""Pipeline stages: one module per stage, and nothing else at this level.

The module files here are the registry of built-in stages (`pipeline.stage`): the file
``train_prior.py`` is the stage type ``train_prior``. Each exports ``VERSION``, ``Config``,
``INPUTS`` and ``run`` (the contract is `pipeline.stage.Stage`).

What several stages share lives in subpackages named for what it is:

- `stages.formats`: the on-disk tables stages hand each other (image tables, sequence tables,
  code shards) and the conversion of stored pixels into model inputs;
- `stages.sources`: where data comes from (IDX files and the embedded MNIST subset, image
  folders, Parquet tables, the procedural dSprites and Moving MNIST generators);
- `stages.training`: the one training skeleton every training loop is written with, and the
  harness that runs a loop in this process or on Ray Train;
- `stages.metrics`: evaluation shared by stages (disentanglement, sample quality, TD-VAE val);
- `stages.figures`: PNG grids of images;
- `stages.sampling`: loading the priors of an autoencoder.
"""
