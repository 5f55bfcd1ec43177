"""ember microbenchmarks: ``python -m bench [suite ...] [--quick] [--out DIR]``.

Layout:
    harness.py   suites registry, timer, input rotation, rows and roofline fractions, the CLI
    report.py    results: JSON merged per suite, markdown tables, PNG plots
    anchors.py   what users have today (torch SDPA flash/cuDNN, cuBLAS, grouped/scaled/int4/2:4
                 GEMMs), each a plain callable
    <suite>.py   one file per suite (roofline, store_kvcache, attention, ...), registered with
                 ``@harness.suite``; the runner discovers every module in this package.
    results/     committed results per GPU: ``<gpu-slug>.json``, ``<gpu-slug>.md``, PNG plots
"""
