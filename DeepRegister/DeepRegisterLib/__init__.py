"""DeepRegister's registration library: usable without Slicer."""
