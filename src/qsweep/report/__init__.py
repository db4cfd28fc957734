"""The decision report: which quantization to deploy for which workload, with the evidence and the
noise. Written at the end of every multirun (to `<sweep dir>/report/` and the sweep's parent run)
and on demand with `python -m qsweep.report` (see `__main__.py`).

rows.py reads jobs back from MLflow; decide.py ranks them under the user's constraints (`report`
config section); figures.py draws; render.py writes Markdown, CSV and HTML; build.py puts it
together and logs it.
"""
