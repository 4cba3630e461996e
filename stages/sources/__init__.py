"""Where data comes from: IDX files and the embedded MNIST subset, image folders and Parquet
image tables, and the procedural dSprites and Moving MNIST generators."""
