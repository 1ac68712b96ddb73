"""Tests of trainctl.health and `trainctl health` (issue 4)."""
