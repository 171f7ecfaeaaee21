"""Simulated A/B tests of served models before they meet live traffic.

``spec`` reads the experiment's TOML (the server's ``[ab]`` routing and the simulator's own
tables), ``world`` builds the simulated users, retrieval and truth, ``simulate`` runs the
experiment in-process or through a real server, ``analysis`` judges it over users, and
``report`` writes what it found; ``experiment`` chains them for ``recdistill abtest``.
"""
