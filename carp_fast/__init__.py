"""carp_fast: CARP self-supervised pretraining, as fast as the hardware allows."""

__version__ = "0.1.0"
