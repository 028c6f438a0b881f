"""Benchmark harnesses over the model organisms (the top layer, beside ``report`` and the CLI).

The organisms package (below ``models``) only builds, trains and loads organisms and their ground truth;
scoring methods against that truth lives here, because it calls the methods being scored:

- :mod:`~recallscope.bench.scoring`: patching, attribution and circuits against an organism's truth (ROC).
- :mod:`~recallscope.bench.route_bench`: the route detector on organism families (AUROC, false routes).
- :mod:`~recallscope.bench.organism_figures`: the base64 dependency map, chunk alignment and route figures.
"""
