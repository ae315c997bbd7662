"""The ``fedllm`` command: parse, dispatch, lazy imports (``main.py``)."""
