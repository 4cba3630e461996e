"""Loading the priors trained on an autoencoder's codes, for the stages that sample."""
