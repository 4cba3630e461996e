"""On-disk formats the stages share: image tables, sequence tables, code shards, and stored
uint8 pixels as model inputs."""
