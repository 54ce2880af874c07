"""Evaluation of frozen backbones: weighted k-NN (``carp_fast.eval.knn``) and the
linear probe (``carp_fast.eval.linear``), on features from ``carp_fast.eval.features``."""
