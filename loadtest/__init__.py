"""Locust load tests that hold the ranking endpoint to its latency budget."""
