"""The typer command-line interface: thin commands, one module per noun, one error boundary."""
