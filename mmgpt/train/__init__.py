"""Training: the LightningModule (loss, logging, optimizers, freezing), the loss itself, the CLI and the check
that a precision setting runs fast on this CPU."""
