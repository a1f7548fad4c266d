"""The choices :func:`DeepRegisterLib.registration.register` accepts, importable without torch
(the command line's ``--help`` and the Slicer module check them before torch loads)."""

from __future__ import annotations

SIMILARITIES = ("mi", "mind", "lncc")  # fine-tuning similarities: mutual information, MIND-SSC, local NCC
SIMILARITY_CHOICES = ("auto", *SIMILARITIES)  # "auto": the model card's
INITIAL_POSITIONS = ("auto", "centers", "physical")
DEFAULT_ITERATIONS_WITHOUT_MODEL = 150  # fine-tuning steps without a trained model
