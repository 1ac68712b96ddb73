"""Reporting: where a job's time went (the goodput ledger) and the timeline picture."""
