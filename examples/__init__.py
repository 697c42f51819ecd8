"""Examples for servecore: a small text app (``textapp``) and its demo (``demo``).

Run the demo with ``make demo`` or ``python -m examples.demo``.
"""
