"""The lm-evaluation-harness adapter: ``--model nsvd`` (``adapter``) and its registration hook (``hook``).

Importing this package imports nothing heavy: the ``.pth`` hook runs at every interpreter start.
"""
