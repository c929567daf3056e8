"""A/B experiments: assignment of users to arms, and the statistics of the report (stats.py)."""
