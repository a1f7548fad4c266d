"""Development tools of DeepRegister, not part of the runtime library.

``benchmark`` and ``benchmark_report`` (``deepregister benchmark``: DeepRegister against elastix and
ANTs, goal checks, plots) and ``sliceviews`` (offscreen Slicer slice views for screenshots and tests).
Nothing the Slicer module or the ``deepregister`` command imports at start-up imports this package: the
CLI imports it only inside the ``benchmark`` command, and the Slicer extension does not install it
(DeepRegister/CMakeLists.txt lists only ``DeepRegisterLib/*.py``, not its subfolders).
"""
