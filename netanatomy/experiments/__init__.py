"""The source papers' experiments at CPU scale, one module per study.

These train small networks and write results files; the library itself never
imports them (experiments use the capability packages, not the other way round).

- :mod:`netanatomy.experiments.banding`: the simplified network of "Weight Banding" and its interventions.
- :mod:`netanatomy.experiments.banding_results`: the banding results file (markdown table + pictures).
- :mod:`netanatomy.experiments.scenes`: the synthetic image sets of the banding study.
- :mod:`netanatomy.experiments.branches`: two-tower CNNs vs unbranched twins on offline photos.
- :mod:`netanatomy.experiments.width`: narrow vs wide layer on Fashion-MNIST (DS/IS curves, width plan).
- :mod:`netanatomy.experiments.soups`: model soups and interpolation barriers on Fashion-MNIST.
- :mod:`netanatomy.experiments._kit`: what the studies share (seeding, data, results-file helpers).
"""
