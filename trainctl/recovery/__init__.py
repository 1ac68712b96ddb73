"""Failure handling: pure decisions (policy), the controller loop, and the goodput ledger."""
