"""Simulated A/B tests of served models before they meet live traffic.

The experiment's TOML is read by :func:`recdistill.config.load_experiment` into the tables
of :mod:`recdistill.ab_spec` (the server's ``[ab]`` routing and the simulator's own);
``world`` builds the simulated users, retrieval and truth, ``simulate`` runs the
experiment in-process or through a real server, ``analysis`` judges it over users, and
``report`` writes what it found; ``experiment`` chains them for ``recdistill abtest``.
"""
