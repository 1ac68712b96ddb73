"""Planning (pure) and the scheduler adapters that start node agents."""
