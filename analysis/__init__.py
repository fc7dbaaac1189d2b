"""Analysis of collabsim results: tables in, gains, fairness, costs, contribution, plots and the report out.

Reads results tables only (``sim.core.results``); never imports Ray or the agents.
``python -m analysis report RUN_DIR...`` writes the HTML report.
"""
