"""Runs every benchmark (`make bench`); each writes its figures to bench/results/<name>.json."""

from bench import (
    data_scale,
    encode_throughput,
    mnist_vqvae2,
    prior_sampling,
    prior_training,
    prior_tune,
    vqvae2_throughput,
)


def main() -> None:
    vqvae2_throughput.main()
    mnist_vqvae2.main()
    encode_throughput.main()
    prior_sampling.main()
    prior_training.main()
    prior_tune.main()
    data_scale.main()


if __name__ == "__main__":
    main()
