"""Research probes of the training data, not part of the held-out evaluation (training/evaluate.py).

``mrus_references``: what the simulated MR/TRUS pairs allow without a model (``python -m
deepregister_training.evaluate --kind mrus-references``): landmark visibility (blob contrast), local image correspondence (patch
correlations) and the gland labels registered to each other.

``gland_prior``: a gland-anchored motion prior (issue #23): landmarks predicted from the two gland centroids and a
population affine fitted on training subjects, with true and with the ``mrus`` network's gland segmentations.
"""
