"""qsweep: quantize, serve, evaluate and load-test LLMs in one declarative, repeatable sweep."""

__version__ = "0.1.0"
