"""The lm-evaluation-harness models: ``--model nsvd`` (``adapter``), ``--model nsvd-onnx``
(``onnx_adapter``) and their registration hook (``hook``).

Importing this package imports nothing heavy: the ``.pth`` hook runs at every interpreter start.
"""
