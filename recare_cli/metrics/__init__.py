"""recare's built-in metrics, one module each; `common` holds what several of them share.

Each module exposes `run(ctx) -> list[Row]` (contract in recare_cli/evaluate/__init__.py) and is
registered in recare_cli/builtins/metrics.py. Heavy imports stay inside functions.
"""
