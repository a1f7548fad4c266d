"""Offline training of DeepRegister's networks (see training/README.md)."""
