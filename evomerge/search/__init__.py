"""Search: spaces derived from operator declarations, Optuna samplers, the ask/tell
loop, and dispatchers (Ray actors, or in-process) that merge and score candidates."""
