"""The benchmark harness: ``python -m benchmarks TASK [options]`` (``python -m benchmarks TASK --help``).

One module per task; :mod:`benchmarks.common` holds what they share (flags, loading, the evaluator, timing, the
result record). Each task prints one JSON object on one line of stdout (``--markdown`` adds a table after it,
``--out FILE`` appends the record to FILE); progress goes to stderr. Importing a task module runs nothing.
Results go to docs/results.md, with the machine and the exact command that the record carries.
"""

#: the tasks, one module each
TASKS = ("sampling", "guidance", "vae", "judges", "throughput", "training", "pixel_vs_latent", "shipped", "full_gpu")
